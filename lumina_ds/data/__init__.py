"""Chat data: format and template, tokenizer, validation, tokenized/streamed documents, packing, resumable batches.

Names that need torch (the batch stream and pipeline) are imported lazily, so validation and preparation stay light.
"""

from typing import Any

from lumina_ds.batch import IGNORE_INDEX, Batch
from lumina_ds.data.chat_format import (
    ASSISTANT,
    BOS,
    END,
    PAD,
    SPECIAL_TOKENS,
    SYSTEM,
    TRAIN_ON_CHOICES,
    USER,
    ChatTemplate,
    Message,
    normalize_role,
)
from lumina_ds.data.checks import parse_conversation
from lumina_ds.data.documents import DocEncoder, JsonlDocs, SourceSpec, TokenizedDocs, parse_train_data
from lumina_ds.data.mixture import Mixture
from lumina_ds.data.packing import PackedDataset, PackedRows
from lumina_ds.data.prepare import EncodeSettings, PrepareReport, prepare_source, tokenize_source
from lumina_ds.data.reader import ReadResult, SkippedLine, iter_conversations, parse_line, read_conversations
from lumina_ds.data.tokenizer import ChatTokenizer, conversation_texts, train_bpe_tokenizer

_LAZY = {
    "PackedBatches": "lumina_ds.data.stream",
    "RankView": "lumina_ds.data.stream",
    "RowPacker": "lumina_ds.data.stream",
    "build_batches": "lumina_ds.data.pipeline",
    "choose_strategy": "lumina_ds.data.pipeline",
    "eval_rows": "lumina_ds.data.pipeline",
    "open_sources": "lumina_ds.data.pipeline",
}

__all__ = [
    "ASSISTANT",
    "BOS",
    "END",
    "IGNORE_INDEX",
    "PAD",
    "SPECIAL_TOKENS",
    "SYSTEM",
    "TRAIN_ON_CHOICES",
    "USER",
    "Batch",
    "ChatTemplate",
    "ChatTokenizer",
    "DocEncoder",
    "EncodeSettings",
    "JsonlDocs",
    "Message",
    "Mixture",
    "PackedDataset",
    "PackedRows",
    "PrepareReport",
    "ReadResult",
    "SkippedLine",
    "SourceSpec",
    "TokenizedDocs",
    "conversation_texts",
    "iter_conversations",
    "normalize_role",
    "parse_conversation",
    "parse_line",
    "parse_train_data",
    "prepare_source",
    "read_conversations",
    "tokenize_source",
    "train_bpe_tokenizer",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
