"""Batched KV-cache generation: prompts of different lengths decoded together, left-padded, one forward per step.

Each row keeps its own positions (0 at its first real token) and a key mask that hides its padding, so a row sees
exactly what it would see decoded alone; greedy output equals `generate` row by row (up to float summation order).
A row that samples a stop id or reaches its budget leaves the batch: its cache rows are dropped and the remaining
steps skip it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import torch

from lumina_ds.errors import ConfigError
from lumina_ds.generation.sampling import (
    SamplingConfig,
    _make_generator,
    fit_prompt,
    last_position_logits,
    sample_next,
    warn_if_cut,
)
from lumina_ds.models.attention import LayerKVCache

if TYPE_CHECKING:
    from lumina_ds.models.transformer import Transformer


class _Rows:
    """The live rows of a left-padded batch: token history, key validity and the next position of each."""

    def __init__(self, prompts: list[list[int]], device: torch.device) -> None:
        width = max(len(p) for p in prompts)
        # padding repeats the row's first token: it is masked out of attention, and the repetition penalty, which
        # reads the history, only ever sees ids the row already holds
        padded = [[p[0]] * (width - len(p)) + p for p in prompts]
        self.history = torch.tensor(padded, dtype=torch.long, device=device)  # [B, T]
        lengths = torch.tensor([len(p) for p in prompts], device=device)  # [B]
        columns = torch.arange(width, device=device)  # [T]
        self.valid = columns[None, :] >= (width - lengths)[:, None]  # [B, T] True at real tokens
        self.positions = (columns[None, :] - (width - lengths)[:, None]).clamp_min(0)  # [B, T]
        self.next_position = lengths  # [B]
        self.index = list(range(len(prompts)))  # each live row's place in the caller's list

    def prefill_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(position_ids, attn_mask [B, 1, T, T]) of the prompts; None, None without padding (the fused causal path).

        The mask is causal over real keys; a padding query sees itself only (a fully masked row would be NaN).
        """
        if bool(self.valid.all()):
            return None, None
        width = self.valid.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=self.valid.device).tril()  # [T, T]
        mask = causal & self.valid[:, None, :]  # [B, T, T]
        mask |= torch.eye(width, dtype=torch.bool, device=self.valid.device)
        return self.positions, mask[:, None]

    def append(self, tokens: torch.Tensor) -> None:
        """tokens [B] join the history as real keys."""
        self.history = torch.cat([self.history, tokens[:, None]], dim=1)
        self.valid = torch.cat([self.valid, self.valid.new_ones(len(self.index), 1)], dim=1)

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(ids [B, 1], position_ids [B, 1], attn_mask [B, 1, 1, T] or None without padding) of the newest token,
        which sees every real key of its row; positions advance by one."""
        positions = self.next_position[:, None]
        self.next_position = self.next_position + 1
        mask = None if bool(self.valid.all()) else self.valid[:, None, None, :]
        return self.history[:, -1:], positions, mask

    def keep(self, rows: list[int], cache: list[LayerKVCache]) -> None:
        """Keep only `rows` (batch indices), here and in the cache; drop the padding columns no live row needs."""
        select = torch.tensor(rows, device=self.history.device)
        self.history, self.valid = self.history[select], self.valid[select]
        self.next_position = self.next_position[select]
        self.index = [self.index[r] for r in rows]
        start = int((~self.valid).all(dim=0).sum())  # left padding: the all-pad columns are the leading ones
        self.history, self.valid = self.history[:, start:], self.valid[:, start:]
        for layer in cache:
            assert layer.k is not None and layer.v is not None
            layer.k, layer.v = layer.k[select, :, start:], layer.v[select, :, start:]


def _fit_rows(prompts: Sequence[Sequence[int]], cfg: SamplingConfig, max_seq_len: int) -> list[tuple[list[int], int]]:
    """fit_prompt for each row (each its own budget: it depends on the row's length), warning for each cut row."""
    fitted = []
    for number, prompt in enumerate(prompts, start=1):
        ids, budget = fit_prompt(list(prompt), cfg.max_new_tokens, max_seq_len)
        label = f"prompt {number} of {len(prompts)}: " if len(prompts) > 1 else ""
        warn_if_cut(len(prompt), len(ids), budget, max_seq_len, label=label)
        fitted.append((ids, budget))
    return fitted


@torch.no_grad()
def generate_batch(
    model: Transformer, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *, stop_ids: Collection[int]
) -> list[list[int]]:
    """Sample up to cfg.max_new_tokens after each prompt (fewer where it leaves less of the context, as `generate`),
    all rows in one forward per step; -> new ids per prompt.

    A stop id or the row's budget ends its row (a stop id is not returned). Greedy output equals `generate` on each
    prompt alone; with sampling the rows draw from one generator, so a seed reproduces the batch, not the single-row
    streams.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("E002", "cannot generate from an empty prompt", "pass at least one token (e.g. BOS)")
    model.eval()
    fitted = _fit_rows(prompts, cfg, model.config.max_seq_len)
    budgets = [budget for _, budget in fitted]
    device = next(model.parameters()).device
    generator = _make_generator(cfg.seed, device)
    rows = _Rows([p for p, _ in fitted], device)
    cache = model.new_kv_cache()
    positions, mask = rows.prefill_inputs()
    with last_position_logits(model):
        logits = model(rows.history, position_ids=positions, attn_mask=mask, kv_cache=cache)["logits"][:, -1]  # [B, V]
    replies: list[list[int]] = [[] for _ in prompts]
    for _ in range(max(budgets)):
        prev = rows.history if cfg.repetition_penalty != 1.0 else None
        tokens = sample_next(logits, cfg, prev, generator)  # [B]
        live = []
        for row, token_id in enumerate(tokens.tolist()):
            reply = replies[rows.index[row]]
            if token_id not in stop_ids:
                reply.append(token_id)
                if len(reply) < budgets[rows.index[row]]:
                    live.append(row)
        if not live:
            break  # no need to run the model for tokens that will not be sampled from
        rows.append(tokens)
        if len(live) < len(rows.index):
            rows.keep(live, cache)
        step_ids, positions, mask = rows.step_inputs()
        logits = model(step_ids, position_ids=positions, attn_mask=mask, kv_cache=cache)["logits"][:, -1]
    return replies
