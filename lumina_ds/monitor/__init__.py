"""Callbacks of the training loop: console line + progress bar, metrics.jsonl, TensorBoard, W&B, speed (TFLOP/s, MFU)
and router health."""

from lumina_ds.monitor.callbacks import Callback, ConsoleLogger, JsonlLogger, MoESummary, TensorBoardLogger
from lumina_ds.monitor.speed import Throughput
from lumina_ds.monitor.wandb_logger import WandbLogger

__all__ = ["Callback", "ConsoleLogger", "JsonlLogger", "MoESummary", "TensorBoardLogger", "Throughput", "WandbLogger"]
