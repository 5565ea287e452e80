"""Training-time estimate: 6·N_active·tokens (+ attention) / (GPUs · peak FLOP/s · MFU), tokens counted quickly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lumina_ds.errors import ConfigError, DataError

# Dense (no sparsity) tensor-core peak FLOP/s per GPU from the vendors' datasheets.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    # H100 SXM5: 989 TFLOP/s bf16/fp16, 67 TFLOP/s fp32 (494 TF32) — NVIDIA H100 datasheet
    "h100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    # H200 SXM: same compute as H100 SXM, more/faster memory — NVIDIA H200 datasheet
    "h200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    # A100 SXM 80GB: 312 TFLOP/s bf16/fp16, 19.5 fp32 — NVIDIA A100 datasheet
    "a100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    # L40S: 362 TFLOP/s bf16/fp16 dense (733 with sparsity), 91.6 fp32 — NVIDIA L40S datasheet
    "l40s": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    # A10G (AWS g5): 70 TFLOP/s bf16/fp16 dense, 35 fp32 — AWS/NVIDIA A10G spec (A10: 125 dense fp16)
    "a10g": {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12},
    # V100 SXM2: 125 TFLOP/s fp16 tensor cores, no bf16, 15.7 fp32 — NVIDIA V100 datasheet
    "v100": {"fp16": 125e12, "fp32": 15.7e12},
    # B200: 2250 TFLOP/s bf16/fp16 dense — NVIDIA DGX B200 datasheet (per GPU)
    "b200": {"bf16": 2250e12, "fp16": 2250e12, "fp32": 80e12},
}
BYTES_PER_TOKEN = 4.0  # English-heavy chat text under a byte-level BPE: ~4 bytes per token
SAMPLE_LINES = 2000


def compute_dtype(precision: str) -> str:
    if precision in ("fp32",):
        return "fp32"
    return "fp16" if precision in ("fp16", "mixed_fp16") else "bf16"


def peak_flops(gpu: str, precision: str) -> float:
    """Datasheet dense peak of `gpu` for the matmul dtype of `precision` (auto plans bf16)."""
    table = PEAK_FLOPS.get(gpu.lower().split("-")[0])  # LuminaAI's hardware profiles: "a100-80gb" -> a100
    if table is None:
        raise ConfigError("E002", f"unknown GPU {gpu!r}", f"choose one of {', '.join(PEAK_FLOPS)}")
    dtype = compute_dtype(precision)
    if dtype not in table:
        raise ConfigError("E002", f"{gpu} has no {dtype} tensor cores", "use --precision mixed_fp16 on this GPU")
    return table[dtype]


@dataclass(frozen=True)
class TokenCount:
    tokens: float
    method: str


def count_tokens(path: str, *, tokenizer: str | None = None) -> TokenCount:
    """Bytes of the file / bytes per token; the ratio comes from the first lines under `tokenizer` if given."""
    file = Path(path)
    if not file.exists():
        raise DataError("E104", f"data file not found: {path}", "Check the path; expected a .jsonl file.")
    size = os.path.getsize(file)
    if tokenizer is None:
        return TokenCount(size / BYTES_PER_TOKEN, f"{size:,} bytes / {BYTES_PER_TOKEN:g} bytes per token")
    from lumina_ds.data.tokenizer import ChatTokenizer

    tok = ChatTokenizer.from_file(tokenizer)
    sampled_bytes, sampled_tokens = 0, 0
    with file.open("rb") as fh:
        for i, line in enumerate(fh):
            if i >= SAMPLE_LINES:
                break
            sampled_bytes += len(line)
            sampled_tokens += len(tok.encode(line.decode("utf-8", errors="replace")))
    ratio = sampled_bytes / max(1, sampled_tokens)
    return TokenCount(size / ratio, f"{size:,} bytes / {ratio:.2f} bytes per token (first {SAMPLE_LINES} lines)")


@dataclass(frozen=True)
class TimeEstimate:
    tokens: float
    flops_per_token: float
    total_flops: float
    seconds: float

    @property
    def hours(self) -> float:
        return self.seconds / 3600


def estimate_time(
    *, tokens: float, flops_per_token: float, epochs: int, gpus: int, gpu: str, precision: str, mfu: float
) -> TimeEstimate:
    if not 0 < mfu <= 1:
        raise ConfigError("E002", f"--mfu {mfu} must be in (0, 1]", "0.3-0.5 is typical for large MoE training")
    total = flops_per_token * tokens * epochs
    seconds = total / (gpus * peak_flops(gpu, precision) * mfu)
    return TimeEstimate(tokens=tokens, flops_per_token=flops_per_token, total_flops=total, seconds=seconds)
