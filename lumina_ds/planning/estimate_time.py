"""Training-time estimate: 6·N_active·tokens (+ attention) / (GPUs · peak FLOP/s · MFU), tokens counted quickly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lumina_ds.errors import ConfigError, DataError
from lumina_ds.planning.hardware import peak_flops

BYTES_PER_TOKEN = 4.0  # English-heavy chat text under a byte-level BPE: ~4 bytes per token
SAMPLE_LINES = 2000


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
    from lumina_ds.tokenizer import ChatTokenizer

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
