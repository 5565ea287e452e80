"""Weight names between lumina-ds and a Hugging Face checkpoint, tensor by tensor (never the whole model in memory).

Our names are `Transformer.named_parameters()`'s (tied embeddings once, as `embed.weight`), which are also the names
of consolidated checkpoint weights (lumina_ds.distributed.consolidate renames AutoEP's modules back to ours). Our
experts are stacked (`ffn.experts.w1` [E, F, H]); Hugging Face checkpoints hold one tensor per expert
(`block_sparse_moe.experts.N.w1.weight` for Mixtral, `mlp.experts.N.gate_proj.weight` for the Qwen-MoE family and
OLMoE), which is what transformers' save_pretrained writes and what `ours_to_hf` writes. Import also reads
transformers 5's fused in-memory layout (`mlp.experts.gate_up_proj` [E, 2F, H], `mlp.experts.down_proj`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from lumina_ds.errors import CheckpointError
from lumina_ds.hf.architectures import SUPPORTED, export_architecture
from lumina_ds.hf.common import refuse
from lumina_ds.models.config import ModelConfig

Reader = Callable[[str], torch.Tensor]

# names a transformers checkpoint may hold that its model ignores on load (old RoPE buffers)
IGNORED_HF = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
# our names as AutoEP calls them inside a running engine (consolidation writes ours; both are read)
OUR_ALIASES = ((".ffn.router.gate.", ".ffn.gate."), (".ffn.shared_experts_gate.", ".ffn.shared_gate."),
               (".ffn.shared_experts.", ".ffn.shared."))  # fmt: skip
EXPERT_NAMES = {
    "mixtral": {"w1": "w1", "w2": "w2", "w3": "w3"},
    "qwen": {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"},
}
DENSE_MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
FUSED_GATE_UP = "gate_up_proj"


@dataclass(frozen=True)
class Entry:
    """One of our tensors and the Hugging Face tensors it is made of."""

    ours: str
    shape: tuple[int, ...]
    hf: tuple[str, ...]  # the Hugging Face tensors, in order
    stacked: bool = False  # ours stacks the hf tensors along a new dim 0 (one per expert)
    fused_half: int = -1  # fused layout: ours is half 0 (gate) or 1 (up) of hf[0] along dim 1


def our_parameter_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names (named_parameters order, tied embeddings once) and shapes, from a model on `meta`."""
    from lumina_ds.models.transformer import meta_transformer

    module = meta_transformer(model)
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def _layer_entry(rest: str, prefix: str, shape: tuple[int, ...], moe_style: str, fused: bool) -> Entry:
    """Entry of one parameter of layer `prefix` (our `layers.i.`), `rest` being the name after it."""
    hf = "model." + prefix
    ours = prefix + rest
    simple = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight"}
    if rest in simple:
        return Entry(ours, shape, (hf + simple[rest],))
    if rest.startswith("attn."):
        return Entry(ours, shape, (hf + "self_attn." + rest.removeprefix("attn."),))
    # transformers 5 renames Mixtral's block_sparse_moe to mlp in memory, where it fuses the experts
    block = hf + ("block_sparse_moe." if moe_style == "mixtral" and not fused else "mlp.")
    if rest == "ffn.gate.weight":
        return Entry(ours, shape, (block + "gate.weight",))
    if rest == "ffn.shared_gate.weight":
        return Entry(ours, shape, (hf + "mlp.shared_expert_gate.weight",))
    match = re.fullmatch(r"ffn\.(shared\.)?(w[123])\.weight", rest)
    if match:
        module = "mlp.shared_expert." if match.group(1) else "mlp."
        return Entry(ours, shape, (hf + module + DENSE_MLP[match.group(2)] + ".weight",))
    match = re.fullmatch(r"ffn\.experts\.(w[123])", rest)
    assert match, f"no Hugging Face name for our parameter {ours}"
    weight = match.group(1)
    if fused:
        fused_name = hf + "mlp.experts." + ("down_proj" if weight == "w2" else FUSED_GATE_UP)
        return Entry(ours, shape, (fused_name,), fused_half={"w1": 0, "w3": 1}.get(weight, -1))
    per_expert = EXPERT_NAMES[moe_style][weight]
    names = tuple(f"{block}experts.{e}.{per_expert}.weight" for e in range(shape[0]))
    return Entry(ours, shape, names, stacked=True)


def mapping(model: ModelConfig, arch: str, *, fused: bool = False) -> list[Entry]:
    """Every one of our parameters with its Hugging Face sources, in our parameter order."""
    if arch not in SUPPORTED:
        raise refuse(arch, "no weight mapping for this architecture", f"supported: {', '.join(SUPPORTED)}")
    moe_style = SUPPORTED[arch].moe
    entries = []
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for name, shape in our_parameter_shapes(model).items():
        if name in top or name == "lm_head.weight":
            entries.append(Entry(name, shape, (top.get(name, name),)))
            continue
        match = re.fullmatch(r"(layers\.\d+\.)(.+)", name)
        assert match, f"no Hugging Face name for our parameter {name}"
        entries.append(_layer_entry(match.group(2), match.group(1), shape, moe_style, fused))
    return entries


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:5])
    return f"{len(names)}: {shown}" + (", ..." if len(names) > 5 else "")


def _check_names(
    expected: Sequence[str], present: Sequence[str], *, what: str, ignorable: Callable[[str], bool]
) -> None:
    """E303 naming the missing and unexpected tensors (the first few of each, and how many)."""
    have, want = set(present), set(expected)
    missing = [n for n in expected if n not in have]
    unexpected = [n for n in present if n not in want and not ignorable(n)]
    if missing or unexpected:
        parts = ([f"missing {_listing(missing)}"] if missing else []) + (
            [f"unexpected {_listing(unexpected)}"] if unexpected else []
        )
        raise CheckpointError(
            "E303",
            f"the {what} tensors do not match the model: " + "; ".join(parts),
            "the checkpoint and its config.json must describe the same model (a dropped or renamed tensor, another "
            "architecture, or a partial download)",
        )


def _check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(
            "E303",
            f"tensor {name} has shape {list(tensor.shape)}, the model needs {list(expected)}",
            "the checkpoint and its config.json must describe the same model",
        )


def _check_shapes(entries: list[Entry], hf_shapes: Mapping[str, Sequence[int]]) -> None:
    """E303 naming every wrongly shaped tensor (the first few, and how many), from shapes alone."""
    wrong = {
        name: f"{name} {list(hf_shapes[name])} (the model needs {list(_hf_shape(entry))})"
        for entry in entries
        for name in entry.hf
        if tuple(hf_shapes[name]) != _hf_shape(entry)
    }  # by name: the fused gate_up tensor feeds two of ours
    if wrong:
        raise CheckpointError(
            "E303",
            f"tensors of the wrong shape, {_listing(list(wrong.values()))}",
            "the checkpoint and its config.json must describe the same model",
        )


def _hf_shape(entry: Entry) -> tuple[int, ...]:
    """The shape each Hugging Face tensor of `entry` must have."""
    if entry.fused_half >= 0:
        experts, ffn, hidden = entry.shape
        return (experts, 2 * ffn, hidden)
    return entry.shape[1:] if entry.stacked else entry.shape


def _is_fused(hf_names: Sequence[str]) -> bool:
    return any(name.endswith(".experts." + FUSED_GATE_UP) for name in hf_names)


def hf_to_ours(
    model: ModelConfig,
    arch: str,
    hf_names: list[str],
    read_hf: Reader,
    *,
    hf_shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[list[str], Reader]:
    """Our parameter names and a reader of each of our tensors from a Hugging Face checkpoint's tensors.

    Missing or unexpected tensors are E303 here; a wrongly shaped one is E303 here when `hf_shapes` (from the
    safetensors headers) is given, else when the reader reaches it. Each read holds one of our tensors at a time.
    """
    entries = mapping(model, arch, fused=_is_fused(hf_names))
    by_ours = {entry.ours: entry for entry in entries}
    expected = list(dict.fromkeys(name for entry in entries for name in entry.hf))
    tied_head = "lm_head.weight" not in by_ours  # transformers ties it to the embedding and ignores a stored one
    _check_names(
        expected,
        hf_names,
        what="Hugging Face",
        ignorable=lambda n: bool(IGNORED_HF.match(n)) or (tied_head and n == "lm_head.weight"),
    )
    if hf_shapes is not None:
        _check_shapes(entries, hf_shapes)

    def read(name: str) -> torch.Tensor:
        entry = by_ours[name]
        parts = []
        for hf_name in entry.hf:
            tensor = read_hf(hf_name)
            _check_shape(hf_name, tensor, _hf_shape(entry))
            parts.append(tensor)
        if entry.stacked:
            return torch.stack(parts)
        if entry.fused_half >= 0:
            ffn = entry.shape[1]
            return parts[0][:, entry.fused_half * ffn : (entry.fused_half + 1) * ffn].clone()
        return parts[0]

    return list(by_ours), read


def ours_to_hf(
    model: ModelConfig, arch: str, our_names: list[str], read_ours: Reader
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) one at a time in the per-expert checkpoint layout; no lm_head when tied.

    `our_names` may use AutoEP's module names. An architecture that cannot carry the model is E005, missing or
    unexpected names are E303, both before anything is read.
    """
    export_architecture(model, arch=arch)
    entries = mapping(model, arch)
    canonical = {_canonical(name): name for name in our_names}
    tied = model.tie_embeddings
    _check_names(
        [e.ours for e in entries], list(canonical), what="lumina-ds", ignorable=lambda n: tied and n == "lm_head.weight"
    )
    opens_gate = not model.moe.shared_expert_gate and "shared_expert_intermediate_size" in SUPPORTED[arch].defaults
    return _hf_tensors(entries, canonical, read_ours, open_shared_gate=opens_gate)


def _hf_tensors(
    entries: list[Entry], canonical: dict[str, str], read_ours: Reader, *, open_shared_gate: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    for entry in entries:
        tensor = read_ours(canonical[entry.ours])
        _check_shape(canonical[entry.ours], tensor, entry.shape)
        if entry.stacked:  # one tensor per expert, each its own copy (a view would keep the whole stack alive)
            for e, hf_name in enumerate(entry.hf):
                yield hf_name, tensor[e].clone()
        elif open_shared_gate and entry.hf[0].endswith(SHARED_DOWN):
            yield from _gated_shared_expert(entry.hf[0], tensor)
        else:
            yield entry.hf[0], tensor


SHARED_DOWN = "mlp.shared_expert.down_proj.weight"


def _gated_shared_expert(down_name: str, down: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Our ungated shared expert in an architecture whose shared expert is always gated (Qwen2-MoE): a zero gate
    gives sigmoid(0) = 1/2 for every token, and the doubled down_proj undoes it. Doubling is exact in any float
    format (only the exponent changes), so the export computes exactly what we do."""
    yield down_name, down * 2
    gate = down_name.removesuffix(SHARED_DOWN) + "mlp.shared_expert_gate.weight"
    yield gate, torch.zeros(1, down.shape[0], dtype=down.dtype)  # [1, H]


def _canonical(name: str) -> str:
    for old, new in OUR_ALIASES:
        name = name.replace(old, new)
    return name
