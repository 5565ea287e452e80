"""Which layers attend through a sliding window, by each architecture's rule in transformers 5.24.

- "none": no window (Llama, OLMoE); a config that sets one is refused (transformers would apply it with
  flash-attention only).
- "all": `sliding_window` on every layer when it is not null (Mistral, Mixtral).
- "all_if_used": `sliding_window` on every layer when `use_sliding_window` (Qwen3-MoE).
- "from_layer": `layer_types`, by default layers i >= max_window_layers when `use_sliding_window` (Qwen2, Qwen3).
- "even_below": `layer_types`, by default even layers i < max_window_layers when `use_sliding_window` (Qwen2-MoE).
"""

from __future__ import annotations

from typing import Any

from lumina_ds.hf.common import HFConfigReader, refuse
from lumina_ds.models.config import ModelConfig


def _default_layer_types(style: str, *, used: bool, first: int, num_layers: int) -> list[str]:
    if style == "from_layer":
        sliding = [used and i >= first for i in range(num_layers)]
    else:
        sliding = [used and i % 2 == 0 and i < first for i in range(num_layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def window_from_hf(c: HFConfigReader, style: str, num_layers: int) -> tuple[int, list[int] | None]:
    """(sliding_window, sliding_window_layers) for ModelConfig; (0, None) without a window."""
    if style == "none":
        if c.hf.get("sliding_window") or c.hf.get("use_sliding_window"):
            raise refuse(c.arch, f"sliding_window={c.hf.get('sliding_window')} is not supported for this architecture")
        return 0, None
    if style == "all":
        return int(c("sliding_window") or 0), None
    used = bool(c("use_sliding_window"))
    window = int(c("sliding_window") or 0) if used else 0
    if style == "all_if_used":
        return window, None
    types = c.hf.get("layer_types") or _default_layer_types(
        style, used=used, first=c("max_window_layers"), num_layers=num_layers
    )
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown or len(types) != num_layers:
        raise refuse(c.arch, f"layer_types {types} are not supported", "full_attention and sliding_attention are")
    layers = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    if layers and not window:
        raise refuse(c.arch, "layer_types name sliding_attention layers but no window is in use")
    if not layers:
        return 0, None
    return window, None if len(layers) == num_layers else layers


def windowed_layers(config: ModelConfig) -> list[int]:
    return [i for i in range(config.num_layers) if config.layer_window(i)]


def window_reason(config: ModelConfig, style: str) -> str | None:
    """Why the architecture's rule cannot place this model's windows (None: it can)."""
    layers, n = windowed_layers(config), config.num_layers
    if not layers:
        return None
    if style == "none":
        return "a sliding window (it has none)"
    if style in ("all", "all_if_used") and len(layers) != n:
        return f"a sliding window on layers {layers} only (it windows every layer)"
    if style == "from_layer" and layers != list(range(layers[0], n)):
        return f"a sliding window on layers {layers} (it windows layers max_window_layers.. only)"
    if style == "even_below" and layers != [i for i in range(layers[-1] + 1) if i % 2 == 0]:
        return f"a sliding window on layers {layers} (it windows even layers below max_window_layers only)"
    return None


def window_to_hf(config: ModelConfig, style: str) -> dict[str, Any]:
    """The config.json keys of the window (for the layered styles, layer_types as transformers 5 writes it too)."""
    assert window_reason(config, style) is None, window_reason(config, style)
    layers, n = windowed_layers(config), config.num_layers
    window = config.sliding_window if layers else None
    if style == "none":
        return {}
    if style == "all":
        return {"sliding_window": window}
    out: dict[str, Any] = {"use_sliding_window": bool(layers), "sliding_window": window}
    if style == "all_if_used":
        return out
    # from_layer: the first windowed layer (none: past the last); even_below: one past the last windowed layer
    first = (layers[0] if layers else n) if style == "from_layer" else (layers[-1] + 1 if layers else 0)
    out["max_window_layers"] = first
    out["layer_types"] = _default_layer_types(style, used=bool(layers), first=first, num_layers=n)
    return out
