"""The one batch type between the data pipeline, the model and the trainer, and the label that carries no loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # a label position without a target (prompt tokens, padding); cross-entropy skips it


class Batch(NamedTuple):
    """Packed rows as LongTensors [B, S]. A NamedTuple: DeepSpeed's ZeRO-3 hooks walk tuples, not other objects."""

    input_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S] pre-shifted: labels[t] is the target at position t, or IGNORE_INDEX
    position_ids: torch.Tensor  # [B, S] restart at 0 where each packed document begins

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in self))

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def without_targets(self, first_row: int) -> Batch:
        """Rows from `first_row` on keep their tokens but carry no loss (padding rows of an evaluation batch)."""
        labels = self.labels.clone()
        labels[first_row:] = IGNORE_INDEX
        return self._replace(labels=labels)
