"""Plain torch modules: no DeepSpeed, no torch.distributed (parallelism is applied from lumina_ds.distributed)."""

from lumina_ds.models.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer"]
