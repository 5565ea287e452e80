"""The 12 model presets, as functions in a registry (dimensions tuned so total parameters match the name)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lumina_ds.config.run import RunConfig, TrainConfig
from lumina_ds.errors import ConfigError
from lumina_ds.models.config import ModelConfig, MoEConfig

PRESETS: dict[str, Callable[[], RunConfig]] = {}
DEFAULT_PRESET = "debug"  # what `train` builds on without --preset or --config-file (an --init-from run too)


def register(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
    PRESETS[fn.__name__] = fn
    return fn


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError("E001", f"unknown preset {name!r}", f"choose one of: {', '.join(PRESETS)}")
    config = PRESETS[name]()
    config.preset = name
    return config


@dataclass(frozen=True)
class _Shape:
    """The architecture numbers that vary between presets."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    context: int
    experts: int
    expert_ffn: int
    shared: int = 0
    rope_theta: float = 10000.0


def _build(
    shape: _Shape,
    *,
    lr: float,
    micro_batch: int,
    grad_accum: int,
    lb_weight: float,
    capacity: float,
    warmup_ratio: float,
    checkpointing: bool,
) -> RunConfig:
    model = ModelConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_layers=shape.layers,
        num_heads=shape.heads,
        num_kv_heads=shape.kv_heads,
        intermediate_size=4 * shape.hidden,
        max_seq_len=shape.context,
        rope_theta=shape.rope_theta,
        tie_embeddings=shape.hidden < 2048,
        moe=MoEConfig(
            num_experts=shape.experts,
            top_k=2,
            expert_intermediate_size=shape.expert_ffn,
            num_shared_experts=shape.shared,
            shared_intermediate_size=shape.expert_ffn if shape.shared else 0,
            capacity_factor=capacity,
            load_balancing_weight=lb_weight,
        ),
    )
    train = TrainConfig(
        learning_rate=lr,
        micro_batch_size=micro_batch,
        grad_accum=grad_accum,
        warmup_ratio=warmup_ratio,
        activation_checkpointing="full" if checkpointing else "none",
    )
    return RunConfig(model=model, train=train)


def _small(shape: _Shape, *, lr: float, micro_batch: int, lb_weight: float, capacity: float) -> RunConfig:
    return _build(
        shape,
        lr=lr,
        micro_batch=micro_batch,
        grad_accum=1,
        lb_weight=lb_weight,
        capacity=capacity,
        warmup_ratio=0.05,
        checkpointing=False,
    )


def _large(
    shape: _Shape, *, lr: float, micro_batch: int, grad_accum: int, lb_weight: float, capacity: float
) -> RunConfig:
    return _build(
        shape,
        lr=lr,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        lb_weight=lb_weight,
        capacity=capacity,
        warmup_ratio=0.1,
        checkpointing=True,
    )


@register
def debug() -> RunConfig:
    config = _small(_Shape(2048, 128, 2, 2, 1, 256, 4, 48), lr=3e-3, micro_batch=8, lb_weight=0.005, capacity=1.1)
    config.train.eval_every_n_steps = 50
    config.checkpoint.save_every_n_steps = 100
    return config


@register
def m70_memory() -> RunConfig:
    return _small(_Shape(16384, 768, 12, 12, 4, 1024, 8, 192), lr=5e-4, micro_batch=8, lb_weight=0.008, capacity=1.25)


@register
def m120_speed() -> RunConfig:
    return _small(_Shape(16384, 768, 16, 12, 4, 1024, 8, 256), lr=5e-4, micro_batch=8, lb_weight=0.008, capacity=1.25)


@register
def b1() -> RunConfig:
    shape = _Shape(32768, 1024, 12, 16, 4, 2048, 8, 3200)
    return _large(shape, lr=3e-4, micro_batch=8, grad_accum=4, lb_weight=0.008, capacity=1.25)


@register
def b3_inference() -> RunConfig:
    shape = _Shape(32768, 2560, 24, 20, 10, 2048, 16, 768)
    return _large(shape, lr=2e-4, micro_batch=4, grad_accum=8, lb_weight=0.01, capacity=1.5)


@register
def b6_quality() -> RunConfig:
    # the seed's 25 heads / 10 KV heads cannot group evenly: 5 KV heads (5 query heads each)
    shape = _Shape(32768, 3200, 32, 25, 5, 4096, 32, 512)
    return _large(shape, lr=1.5e-4, micro_batch=2, grad_accum=16, lb_weight=0.01, capacity=1.5)


@register
def b7() -> RunConfig:
    shape = _Shape(65536, 2048, 22, 16, 8, 4096, 16, 2816, shared=1)
    return _large(shape, lr=1.5e-4, micro_batch=4, grad_accum=8, lb_weight=0.01, capacity=1.5)


@register
def b14() -> RunConfig:
    shape = _Shape(65536, 2560, 28, 20, 10, 4096, 32, 1856, shared=1)
    return _large(shape, lr=1e-4, micro_batch=2, grad_accum=16, lb_weight=0.015, capacity=1.8)


@register
def b50() -> RunConfig:
    shape = _Shape(131072, 5120, 40, 40, 10, 128000, 64, 1152, shared=1, rope_theta=500000.0)
    return _large(shape, lr=6e-5, micro_batch=1, grad_accum=32, lb_weight=0.015, capacity=1.8)


@register
def b100() -> RunConfig:
    shape = _Shape(131072, 7168, 48, 56, 14, 200000, 96, 896, shared=1, rope_theta=1000000.0)
    return _large(shape, lr=5e-5, micro_batch=1, grad_accum=64, lb_weight=0.025, capacity=2.0)


@register
def b200() -> RunConfig:
    shape = _Shape(131072, 8192, 56, 64, 16, 1000000, 128, 1088, shared=1, rope_theta=10000000.0)
    return _large(shape, lr=4e-5, micro_batch=1, grad_accum=64, lb_weight=0.03, capacity=2.4)


@register
def b300() -> RunConfig:
    shape = _Shape(131072, 9216, 64, 72, 18, 204800, 144, 1088, shared=1, rope_theta=1000000.0)
    return _large(shape, lr=3e-5, micro_batch=1, grad_accum=64, lb_weight=0.035, capacity=2.8)
