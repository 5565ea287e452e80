"""From a JSONL file to resumable micro-batches of packed rows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lumina_ds.data.chat_format import ChatTemplate
from lumina_ds.data.packing import PackedRows, pack_conversations
from lumina_ds.data.reader import SkippedLine, read_conversations
from lumina_ds.data.sampler import ShardedSampler
from lumina_ds.data.tokenizer import ChatTokenizer
from lumina_ds.errors import DataError

BATCH_KEYS = ("input_ids", "labels", "position_ids")


class PackedDataset:
    """Random access to packed rows as torch tensors."""

    def __init__(self, rows: PackedRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Stack the given rows into `{"input_ids", "labels", "position_ids"}` LongTensors [B, S]."""
        index = np.asarray(indices, dtype=np.int64)
        return {key: torch.from_numpy(getattr(self.rows, key)[index].astype(np.int64)) for key in BATCH_KEYS}


class BatchIterator:
    """Micro-batches over epochs (forever if `num_epochs` is None); resumable through the sampler state."""

    def __init__(
        self,
        data: PackedRows | PackedDataset,
        sampler: ShardedSampler,
        *,
        micro_batch_size: int,
        num_epochs: int | None = None,
    ) -> None:
        self.dataset = data if isinstance(data, PackedDataset) else PackedDataset(data)
        if sampler.num_samples != len(self.dataset):
            raise ValueError(f"sampler covers {sampler.num_samples} rows but the dataset has {len(self.dataset)}")
        if micro_batch_size < 1 or len(sampler) < micro_batch_size:
            raise DataError(
                "E105",
                f"{len(sampler)} rows per data-parallel rank cannot fill one micro-batch of {micro_batch_size}",
                "Add data, lower seq_len or micro_batch_size, or use fewer data-parallel ranks.",
            )
        self.sampler = sampler
        self.micro_batch_size = micro_batch_size
        self.num_epochs = num_epochs

    @property
    def epoch(self) -> int:
        """Current epoch (0-based)."""
        return self.sampler.epoch

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch on this rank; the incomplete last one is dropped so all ranks step together."""
        return len(self.sampler) // self.micro_batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches from the saved position; epochs advance until `num_epochs` (an absolute count)."""
        size = self.micro_batch_size
        while self.num_epochs is None or self.sampler.epoch < self.num_epochs:
            remaining = self.batches_per_epoch - self.sampler.position // size
            indices = iter(self.sampler)
            for _ in range(remaining):
                yield self.dataset.batch(list(islice(indices, size)))
            self.sampler.set_epoch(self.sampler.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        """Sampler state; after loading, the next batch is the first one not yet yielded."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the sampler state."""
        self.sampler.load_state_dict(state)


@dataclass
class ChatDataset:
    """A packed chat file plus what was skipped and token counts."""

    rows: PackedRows
    skipped: list[SkippedLine]
    num_conversations: int
    num_tokens: int
    num_target_tokens: int


def load_chat_dataset(
    path: str | Path,
    *,
    tokenizer: ChatTokenizer,
    seq_len: int,
    train_on: str = "assistant",
    template: ChatTemplate | None = None,
) -> ChatDataset:
    """Read, encode and pack a JSONL chat file; bad lines are skipped and reported in `skipped`."""
    result = read_conversations(path)
    if not result.conversations:
        raise DataError(
            "E106",
            f"no usable conversations in {path} ({len(result.skipped)} of {result.total_lines} lines skipped)",
            f"Run `lumina-ds validate-data {path} --report` to see what is wrong.",
        )
    template = template or ChatTemplate()
    encoded = [template.encode_conversation(m, tokenizer, train_on=train_on) for m in result.conversations]
    rows = pack_conversations(encoded, seq_len=seq_len, pad_id=tokenizer.pad_id)
    return ChatDataset(
        rows=rows,
        skipped=result.skipped,
        num_conversations=len(result.conversations),
        num_tokens=rows.num_tokens,
        num_target_tokens=rows.num_target_tokens,
    )


def build_datasets(
    train_path: str | Path,
    eval_path: str | Path | None = None,
    *,
    tokenizer: ChatTokenizer,
    seq_len: int,
    train_on: str = "assistant",
) -> tuple[ChatDataset, ChatDataset | None]:
    """Load the training file and, if given, the evaluation file with the same settings."""
    train = load_chat_dataset(train_path, tokenizer=tokenizer, seq_len=seq_len, train_on=train_on)
    if eval_path is None:
        return train, None
    return train, load_chat_dataset(eval_path, tokenizer=tokenizer, seq_len=seq_len, train_on=train_on)
