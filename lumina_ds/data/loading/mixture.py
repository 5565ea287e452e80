"""The global document order of each epoch, a function of (seed, epoch) only (rows are packed from it in
data/global_order.py, then shared out to the ranks)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lumina_ds.errors import DataError


class Mixture:
    """Documents of several sources, each repeated `weight` times per epoch on average, shuffled together.

    A weight of 1 uses every document once per epoch; 0.3 a fresh random 30% each epoch; 2.5 every document twice
    plus a random half. Global document ids are source offset + line index.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], *, seed: int, shuffle: bool = True) -> None:
        assert len(sizes) == len(weights) and all(w > 0 for w in weights)
        self.sizes = [int(n) for n in sizes]
        self.weights = [float(w) for w in weights]
        self.seed = seed
        self.shuffle = shuffle
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def docs_per_epoch(self) -> int:
        """Document draws per epoch over all sources."""
        return sum(self.count(i) for i in range(len(self.sizes)))

    def count(self, source: int) -> int:
        """Draws from `source` per epoch."""
        return round(self.weights[source] * self.sizes[source])

    def _source_draws(self, source: int, epoch: int) -> np.ndarray:
        n, count = self.sizes[source], self.count(source)
        if not self.shuffle and count == n:
            return np.arange(n, dtype=np.int64)
        reps = [np.random.default_rng([self.seed, epoch, source, r]).permutation(n) for r in range(-(-count // n))]
        return np.concatenate(reps)[:count] if reps else np.zeros(0, np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global document ids of one epoch, in order."""
        if self._cache is None or self._cache[0] != epoch:
            draws = [self._source_draws(s, epoch) + self.offsets[s] for s in range(len(self.sizes))]
            order = np.concatenate(draws) if draws else np.zeros(0, np.int64)
            if self.shuffle:
                order = order[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
            self._cache = (epoch, order.astype(np.int64))
        return self._cache[1]

    def locate(self, doc_id: int) -> tuple[int, int]:
        """Global id -> (source index, document index within it)."""
        source = int(np.searchsorted(self.offsets, doc_id, side="right")) - 1
        return source, int(doc_id - self.offsets[source])

    def check_world(self, world_size: int) -> None:
        """E105 when an epoch cannot give every rank at least one document."""
        if self.docs_per_epoch < world_size:
            raise DataError(
                "E105",
                f"{self.docs_per_epoch} conversations per epoch cannot be split over {world_size} data-parallel ranks",
                "Add data, raise the mixing weights, or use fewer data-parallel ranks.",
            )
