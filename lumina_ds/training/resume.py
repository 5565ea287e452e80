"""What a resumed run takes from its flags rather than from the checkpoint: the optimisation settings a user changed
(learning rate, schedule, warm-up, betas, epsilon, weight decay; clipping and the step count already follow the
run's config). DeepSpeed restores the optimizer's and scheduler's saved values, so they are applied again here."""

from __future__ import annotations

from typing import Any

from lumina_ds.config.run import RunConfig
from lumina_ds.training.engine import Engine
from lumina_ds.training.schedule import schedule_for

FOLLOWED = ("learning_rate", "min_lr", "warmup_ratio", "warmup_steps", "lr_scheduler", "beta1", "beta2", "eps",
            "weight_decay", "max_grad_norm", "max_steps", "epochs")  # fmt: skip


def changed_settings(saved: dict[str, Any], run: RunConfig) -> list[str]:
    """'name: old -> new' for each followed training setting the run changed since the checkpoint."""
    before = saved.get("train", {})
    now = vars(run.train)
    return [
        f"{name}: {before[name]} -> {now[name]}" for name in FOLLOWED if name in before and before[name] != now[name]
    ]


def apply_changed_settings(engine: Engine, run: RunConfig, saved: dict[str, Any], total_steps: int) -> list[str]:
    """Put the run's learning rate, schedule and AdamW settings into the restored optimizer and scheduler; returns
    what changed (for the log)."""
    changes = changed_settings(saved, run)
    if not changes:
        return []
    train = run.train
    scheduler = getattr(engine, "lr_scheduler", None)
    for group in engine.optimizer.param_groups:
        group["betas"], group["eps"] = (train.beta1, train.beta2), train.eps
        if str(group.get("name", "")).startswith("decay"):  # norms keep no decay (training/engine.py)
            group["weight_decay"] = train.weight_decay
    if scheduler is not None:
        schedule = schedule_for(train, total_steps)
        scheduler.base_lrs = [train.learning_rate] * len(engine.optimizer.param_groups)
        scheduler.lr_lambdas = [schedule] * len(engine.optimizer.param_groups)
        for group in engine.optimizer.param_groups:
            group["lr"] = train.learning_rate * schedule(scheduler.last_epoch)
    return changes
