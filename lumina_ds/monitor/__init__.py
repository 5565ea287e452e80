"""Callbacks of the training loop: console line + progress bar, metrics.jsonl, TensorBoard."""

from lumina_ds.monitor.callbacks import Callback, ConsoleLogger, JsonlLogger, TensorBoardLogger

__all__ = ["Callback", "ConsoleLogger", "JsonlLogger", "TensorBoardLogger"]
