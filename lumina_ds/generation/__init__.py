"""Inference: loading a trained checkpoint, KV-cached sampling, and the chat session / REPL."""

from lumina_ds.generation.batched import generate_batch
from lumina_ds.generation.chat import ChatSession, handle_command, one_shot, run_repl
from lumina_ds.generation.loading import InferenceBundle, check_state_dict, load_for_inference
from lumina_ds.generation.sampling import SamplingConfig, filter_logits, generate, sample_next

__all__ = [
    "ChatSession",
    "InferenceBundle",
    "SamplingConfig",
    "check_state_dict",
    "filter_logits",
    "generate",
    "generate_batch",
    "handle_command",
    "load_for_inference",
    "one_shot",
    "run_repl",
    "sample_next",
]
