from __future__ import annotations

import numpy as np
import pytest

from lumina_ds.data import ShardedSampler
from lumina_ds.errors import DataError


def test_two_ranks_partition_the_permutation() -> None:
    n = 11
    ranks = [list(ShardedSampler(n, rank=r, world_size=2, seed=3)) for r in range(2)]
    permutation = np.random.default_rng([3, 0]).permutation(n)
    assert ranks[0] == permutation[0:10:2].tolist()
    assert ranks[1] == permutation[1:10:2].tolist()
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(permutation[:10].tolist())
    assert len(ShardedSampler(n, rank=1, world_size=2)) == 5


def test_order_depends_only_on_seed_and_epoch() -> None:
    first, second = ShardedSampler(50, seed=7), ShardedSampler(50, seed=7)
    assert list(first) == list(second)
    first.set_epoch(1)
    epoch_one = list(first)
    assert sorted(epoch_one) == list(range(50))
    assert epoch_one != list(ShardedSampler(50, seed=7))
    assert list(ShardedSampler(50, seed=8)) != list(ShardedSampler(50, seed=7))


def test_no_shuffle_is_sequential() -> None:
    assert list(ShardedSampler(7, rank=1, world_size=3, shuffle=False)) == [1, 4]


def test_resume_mid_epoch_yields_the_rest_exactly() -> None:
    sampler = ShardedSampler(20, rank=1, world_size=2, seed=1)
    sampler.set_epoch(2)
    sampler_ref = ShardedSampler(20, rank=1, world_size=2, seed=1)
    sampler_ref.set_epoch(2)
    full = list(sampler_ref)
    iterator = iter(sampler)
    consumed = [next(iterator) for _ in range(4)]
    state = sampler.state_dict()
    assert state == {"epoch": 2, "position": 4}
    restored = ShardedSampler(20, rank=1, world_size=2, seed=1)
    restored.load_state_dict(state)
    restored.set_epoch(2)  # a loop that calls set_epoch(current) after loading must not rewind
    assert consumed + list(restored) == full


def test_set_epoch_restarts_position() -> None:
    sampler = ShardedSampler(6)
    list(sampler)
    assert sampler.position == 6 and list(sampler) == []
    sampler.set_epoch(1)
    assert sampler.position == 0 and len(list(sampler)) == 6


def test_too_small_for_world_size_is_e105() -> None:
    with pytest.raises(DataError) as info:
        ShardedSampler(3, rank=0, world_size=4)
    assert info.value.code == "E105"
    assert "fewer data-parallel ranks" in info.value.hint


def test_incompatible_state_is_rejected() -> None:
    with pytest.raises(DataError) as info:
        ShardedSampler(10, world_size=2).load_state_dict({"epoch": 0, "position": 6})
    assert info.value.code == "E107"
