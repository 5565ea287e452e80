from __future__ import annotations

import numpy as np

from lumina_ds.data.loading.mixture import Mixture


def test_weight_one_uses_every_document_once_per_epoch() -> None:
    mixture = Mixture([7, 5], [1.0, 1.0], seed=3)
    for epoch in range(3):
        assert sorted(mixture.epoch_order(epoch).tolist()) == list(range(12))


def test_fractional_and_above_one_weights_set_copies_per_epoch() -> None:
    mixture = Mixture([10, 8], [0.5, 2.5], seed=1)
    assert mixture.docs_per_epoch == 5 + 20
    for epoch in range(2):
        order = mixture.epoch_order(epoch)
        first, second = order[order < 10], order[order >= 10] - 10
        assert len(first) == 5 and len(set(first.tolist())) == 5  # half of source 0, no repeats
        counts = np.bincount(second, minlength=8)
        assert counts.sum() == 20 and set(counts.tolist()) <= {2, 3}  # every doc twice, half of them three times
    halves = [set(o[o < 10].tolist()) for o in (mixture.epoch_order(0), mixture.epoch_order(1))]
    assert halves[0] != halves[1]  # a fresh subset each epoch


def test_order_depends_only_on_seed_and_epoch() -> None:
    a, b = Mixture([50], [1.0], seed=7), Mixture([50], [1.0], seed=7)
    assert a.epoch_order(2).tolist() == b.epoch_order(2).tolist()
    assert a.epoch_order(0).tolist() != a.epoch_order(1).tolist()
    assert a.epoch_order(0).tolist() != Mixture([50], [1.0], seed=8).epoch_order(0).tolist()
    assert Mixture([6], [1.0], seed=0, shuffle=False).epoch_order(4).tolist() == list(range(6))


def test_locate_maps_global_ids_back_to_sources() -> None:
    mixture = Mixture([3, 4], [1.0, 1.0], seed=0)
    assert [mixture.locate(i) for i in (0, 2, 3, 6)] == [(0, 0), (0, 2), (1, 0), (1, 3)]
