"""lumina-ds: train decoder-only Mixture-of-Experts language models on conversations with DeepSpeed."""

__version__ = "0.1.0"
