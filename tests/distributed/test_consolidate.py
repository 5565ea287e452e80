"""Consolidated weights: streamed by rank 0 into bounded safetensors shards, one tensor at a time; the other ranks
never hold more than the tensor being gathered (a 2-rank ZeRO-3 run used to give every rank the whole model)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lumina_ds.distributed.consolidate import write_consolidated
from lumina_ds.generation.loading import _read_weights, weights_files
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.transformer import Transformer
from lumina_ds.run_dir import INDEX_FILE, WEIGHTS_FILE
from tests.runs import call_on_ranks


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                       moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=24)))  # fmt: skip


def test_small_shards_with_an_index_hold_every_weight_once(tmp_path: Path) -> None:
    model = tiny()
    files = write_consolidated(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and files[-1].name == INDEX_FILE and not list(tmp_path.glob("*.tmp"))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    expected = {n: p.detach() for n, p in model.named_parameters()}  # the tied lm_head once, as embed.weight
    assert set(index["weight_map"]) == set(expected) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in expected.values())
    for path in tmp_path.glob("model-*.safetensors"):  # bounded, except a single tensor larger than the bound
        tensors = load_file(str(path))
        assert sum(t.nbytes for t in tensors.values()) <= 20_000 or len(tensors) == 1
    loaded = _read_weights(weights_files(tmp_path))
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[n], t) and loaded[n].dtype == t.dtype for n, t in expected.items())


def test_one_shard_is_model_safetensors_in_the_module_dtype(tmp_path: Path) -> None:
    model = tiny().to(torch.bfloat16)
    assert [p.name for p in write_consolidated(model, tmp_path)] == [WEIGHTS_FILE]
    assert {t.dtype for t in _read_weights(weights_files(tmp_path)).values()} == {torch.bfloat16}


SHARD_BYTES = 32 << 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def consolidate_zero3(out: str) -> None:
    """One of two ranks: a ZeRO-3, EP-2 engine of m70_memory (74M parameters, 296 MB in fp32; the embedding, 50 MB, is
    the largest tensor) steps once, then its weights are consolidated into `out` in 32 MB shards while a thread samples
    this process's resident memory."""
    from lumina_ds.config.presets import get_preset
    from lumina_ds.distributed.env import barrier, init_distributed
    from lumina_ds.models.counting import count_parameters
    from lumina_ds.training.engine import build_engine, build_model

    info = init_distributed()
    run = get_preset("m70_memory")
    run.distributed.zero_stage, run.distributed.expert_parallel_size = 3, 2
    run.train.micro_batch_size, run.train.precision = 1, "fp32"
    torch.manual_seed(0)
    engine: Any = build_engine(build_model(run, world_size=2, precision="fp32"), run, info=info, total_steps=1,
                               precision="fp32").engine  # fmt: skip
    ids = torch.randint(6, 1000, (1, 64))
    engine.backward(engine(ids, labels=ids, position_ids=torch.arange(64)[None])["loss"])
    engine.step()
    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    files = write_consolidated(engine.module, Path(out), max_shard_bytes=SHARD_BYTES)
    done.set()
    sampler.join()
    total = count_parameters(run.model).total * 4
    largest = max(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()) * 4
    result = {"growth": max(peak[0], rss()) - base, "model": total, "largest": largest,
              "files": [f.name for f in files]}  # fmt: skip
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(result))
    barrier()


@pytest.mark.slow
def test_zero3_consolidation_keeps_host_memory_bounded_on_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "tag"
    out.mkdir()
    proc = call_on_ranks(consolidate_zero3, str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    model, largest = rank0["model"], rank0["largest"]  # 296 MB of fp32 weights; the embedding, 50 MB, is largest
    # rank 1 only helps gather: the tensor in flight, not the model. DeepSpeed's own gather of one parameter costs
    # about twice its size (measured: 94 MB for the embedding alone), so that is the floor
    assert rank1["growth"] < 2.5 * largest < 0.5 * model and rank1["files"] == []
    # rank 0: one shard being filled, plus the tensor in flight and its copy
    assert rank0["growth"] < SHARD_BYTES + 3 * largest
    assert len(rank0["files"]) > 5 and rank0["files"][-1] == INDEX_FILE
    weights = _read_weights(weights_files(out))
    assert sum(t.numel() for t in weights.values()) * 4 == model  # every expert of both ranks, once
    assert weights["layers.0.ffn.experts.w1"].shape[0] == 8
