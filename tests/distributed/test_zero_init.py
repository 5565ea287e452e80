"""ZeRO-3 builds the model partitioned (deepspeed.zero.Init) with the same initial weights as a plain build."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.distributed.conftest import run_single_rank

SCRIPT = textwrap.dedent(
    """
    import torch, deepspeed
    from lumina_ds.config.presets import get_preset
    from lumina_ds.distributed.env import init_distributed
    from lumina_ds.training.engine import build_model

    init_distributed()
    run = get_preset("debug")
    torch.manual_seed(0)
    plain = dict(run.model.build().named_parameters())
    run.distributed.zero_stage = 3
    torch.manual_seed(0)
    model = build_model(run, world_size=1, precision="fp32")
    params = dict(model.named_parameters())
    assert params.keys() == plain.keys()
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values())  # partitioned placeholders
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in params.items():
            assert torch.equal(p, plain[name]), name
    assert model.lm_head.weight is model.embed.weight  # still tied
    run.distributed.zero_stage = 2
    assert not hasattr(next(build_model(run, world_size=1, precision="fp32").parameters()), "ds_id")
    print("OK", len(params))
    """
)


def test_zero3_build_is_partitioned_and_equals_plain_init(tmp_path: Path) -> None:
    proc = run_single_rank(SCRIPT, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
