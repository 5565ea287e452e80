"""Token sampling (repetition penalty, temperature, top-k, top-p) and KV-cached autoregressive generation."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lumina_ds.errors import ConfigError

if TYPE_CHECKING:
    from lumina_ds.models.transformer import Transformer

# Slack for the top-p comparison: softmax of float32 logits does not reproduce probabilities exactly, and a nucleus
# whose mass is 0.8 up to rounding must count as reaching top_p=0.8.
TOP_P_EPS = 1e-6
# A prompt that fills the context is cut to leave 1/REPLY_ROOM_SHARE of it for the reply (32 of the debug preset's 256)
REPLY_ROOM_SHARE = 8


@dataclass
class SamplingConfig:
    """How the next token is chosen. temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; penalty 1.0 = off."""

    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise ConfigError("E002", f"temperature={self.temperature} must be >= 0", "use 0 for greedy decoding")
        if not 0 < self.top_p <= 1:
            raise ConfigError("E002", f"top_p={self.top_p} must be in (0, 1]", "use 1.0 to turn nucleus sampling off")
        if self.top_k < 0:
            raise ConfigError("E002", f"top_k={self.top_k} must be >= 0", "use 0 to turn top-k filtering off")
        if self.max_new_tokens < 1:
            raise ConfigError("E002", f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.repetition_penalty > 0:
            raise ConfigError(
                "E002", f"repetition_penalty={self.repetition_penalty} must be > 0", "use 1.0 for no penalty"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token id in prev_ids [B, T]: positive logits are divided by the penalty, negative
    ones multiplied by it, so penalty > 1 always makes a seen token less likely (whatever the sign of its logit)."""
    if penalty == 1.0 or prev_ids.numel() == 0:
        return logits
    seen = logits.gather(-1, prev_ids)  # [B, T]
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)  # [B, T]
    return logits.scatter(-1, prev_ids, seen)  # [B, V]


def _top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly k candidates per row (ties at the k-th value are broken by torch.topk's order)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(k, dim=-1).indices, True)  # [B, V]
    return logits.masked_fill(~keep, float("-inf"))


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus: the smallest set of most likely tokens whose probability mass is >= top_p.

    A token is kept iff the mass of the tokens ranked strictly above it is < top_p; so the most likely token is always
    kept, and with probs [0.5, 0.3, 0.15, 0.05] top_p=0.8 keeps 2 tokens (0.5 + 0.3 reaches 0.8), top_p=0.81 keeps 3.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    probs = sorted_logits.softmax(dim=-1)  # [B, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V] mass of strictly higher-ranked tokens
    drop_sorted = mass_before >= top_p - TOP_P_EPS  # [B, V]
    drop_sorted[..., 0] = False  # the most likely token always stays (even for a top_p below TOP_P_EPS)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [B, V] back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig, prev_ids: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> float32 logits [B, V] with filtered-out tokens at -inf, in the order: repetition penalty
    (over prev_ids [B, T], if given), temperature, top-k, top-p. Temperature 0 keeps only the argmax."""
    logits = logits.float()  # [B, V]
    if prev_ids is not None:
        logits = apply_repetition_penalty(logits, prev_ids.to(logits.device), cfg.repetition_penalty)
    if cfg.greedy:
        best = logits.argmax(dim=-1, keepdim=True)  # [B, 1]
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, best, True)  # [B, V]
        return logits.masked_fill(~keep, float("-inf"))
    logits = logits / cfg.temperature  # [B, V]
    logits = _top_k(logits, cfg.top_k)
    return _top_p(logits, cfg.top_p)


def sample_next(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    prev_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    filtered = filter_logits(logits, cfg, prev_ids)  # [B, V]
    if cfg.greedy:
        return filtered.argmax(dim=-1)  # [B]
    probs = filtered.softmax(dim=-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]


def reply_room(max_new_tokens: int, max_seq_len: int) -> int:
    """The reply budget left after cutting a prompt that fills the context: a small share of it, enough for an answer
    while the cut drops as little of the conversation as possible."""
    return max(1, min(max_new_tokens, max_seq_len // REPLY_ROOM_SHARE, max_seq_len - 1))


def fit_prompt(prompt_ids: list[int], max_new_tokens: int, max_seq_len: int) -> tuple[list[int], int]:
    """-> (prompt, reply budget), so that prompt + reply fit in max_seq_len.

    The prompt comes first: a prompt that leaves room for a reply is kept whole and the reply gets
    min(max_new_tokens, max_seq_len - len(prompt)). Only a prompt that fills the context is cut, from the left (its
    end, nearest the reply, stays), to leave reply_room() tokens.
    """
    room = max_seq_len - len(prompt_ids)
    if room >= 1:
        return list(prompt_ids), min(max_new_tokens, room)
    budget = reply_room(max_new_tokens, max_seq_len)
    return list(prompt_ids[len(prompt_ids) - (max_seq_len - budget) :]), budget


def cut_warning(prompt_tokens: int, kept: int, budget: int, max_seq_len: int) -> str | None:
    """The one-line warning for a prompt fit_prompt cut (None when it was kept whole)."""
    dropped = prompt_tokens - kept
    if dropped <= 0:
        return None
    size = "fills the whole" if prompt_tokens == max_seq_len else "is longer than the"
    return (
        f"the prompt ({prompt_tokens} tokens) {size} model's context of {max_seq_len} tokens: dropped its first "
        f"{dropped} tokens, kept the last {kept} and left {budget} for the reply"
    )


def warn_if_cut(prompt_tokens: int, kept: int, budget: int, max_seq_len: int, *, label: str = "") -> None:
    """Print cut_warning() to stderr, where it does not mix with a streamed reply on stdout."""
    message = cut_warning(prompt_tokens, kept, budget, max_seq_len)
    if message is not None:
        print(f"warning: {label}{message}", file=sys.stderr, flush=True)


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@contextlib.contextmanager
def last_position_logits(model: Transformer) -> Iterator[None]:
    """Within: the final norm (hence the LM head) sees the last position only. A prefill needs one logit row per
    prompt, not [B, T, V]: at 8 x 512 prompts and a 8192 vocabulary the full head is 17 GFLOP and 134 MB of fp32."""
    handle = model.norm.register_forward_pre_hook(lambda _module, args: (args[0][:, -1:],))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    *,
    stop_ids: Collection[int],
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Sample up to cfg.max_new_tokens after prompt_ids, fewer where the prompt leaves less of the context (a prompt
    that fills it is cut, with a warning: fit_prompt); a stop id ends generation and is not returned.

    The prompt is prefilled once into a KV cache, then each step feeds only the newest token (positions continue
    from the cache length). on_token is called with each returned token as soon as it is chosen.
    """
    if not prompt_ids:
        raise ConfigError("E002", "cannot generate from an empty prompt", "pass at least one token (e.g. BOS)")
    model.eval()
    prompt, budget = fit_prompt(list(prompt_ids), cfg.max_new_tokens, model.config.max_seq_len)
    warn_if_cut(len(prompt_ids), len(prompt), budget, model.config.max_seq_len)
    device = next(model.parameters()).device
    generator = _make_generator(cfg.seed, device)
    history = torch.tensor([prompt], dtype=torch.long, device=device)  # [1, P], for the repetition penalty
    cache = model.new_kv_cache()
    with last_position_logits(model):
        logits = model(history, kv_cache=cache)["logits"][:, -1]  # [1, V]
    out: list[int] = []
    for _ in range(budget):
        prev = history if cfg.repetition_penalty != 1.0 else None
        token = sample_next(logits, cfg, prev, generator)  # [1]
        token_id = int(token.item())
        if token_id in stop_ids:
            break
        out.append(token_id)
        if on_token is not None:
            on_token(token_id)
        if len(out) == budget:
            break  # no need to run the model for a token that will not be sampled from
        step = token.view(1, 1)  # [1, 1]
        history = torch.cat([history, step], dim=1)  # [1, P + t]
        logits = model(step, kv_cache=cache)["logits"][:, -1]  # [1, V]
    return out
