"""Deterministic, resumable, data-parallel sharded index sampler."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from lumina_ds.errors import ConfigError, DataError


class ShardedSampler:
    """Yields this rank's indices for one epoch; order depends only on (seed, epoch)."""

    def __init__(
        self, num_samples: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError("E002", f"invalid rank {rank} for world size {world_size}")
        if num_samples // world_size == 0:
            raise DataError(
                "E105",
                f"{num_samples} samples cannot be split over {world_size} data-parallel ranks",
                "Add data, lower seq_len (more packed rows) or use fewer data-parallel ranks.",
            )
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # indices of this epoch already handed out on this rank
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Indices per rank per epoch (the tail that does not divide evenly is dropped)."""
        return self.num_samples // self.world_size

    def epoch_indices(self) -> np.ndarray:
        """All of this rank's indices for the current epoch, in order."""
        if self._cache is None or self._cache[0] != self.epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples)
            kept = order[: len(self) * self.world_size]
            self._cache = (self.epoch, kept[self.rank :: self.world_size])
        return self._cache[1]

    def __iter__(self) -> Iterator[int]:
        """Yield the remaining indices of the current epoch, starting at the saved position."""
        indices = self.epoch_indices()
        while self.position < len(indices):
            index = int(indices[self.position])
            # Counted before yielding, so a state saved after consuming an index never replays it.
            self.position += 1
            yield index

    def set_epoch(self, epoch: int) -> None:
        """Switch epoch; the position restarts only if the epoch actually changes (keeps resumes intact)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """Epoch and position within it."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore epoch and position."""
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise DataError(
                "E107",
                f"sampler position {position} is outside an epoch of {len(self)} samples per rank",
                "The dataset or world size changed since the checkpoint; resume with the same data and ranks.",
            )
        self.epoch = int(state["epoch"])
        self.position = position
