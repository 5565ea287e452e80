"""Chat data: format and template, tokenizer, JSONL reader, packing, resumable sharded batches."""

from lumina_ds.data.chat_format import (
    ASSISTANT,
    BOS,
    END,
    IGNORE_INDEX,
    PAD,
    SPECIAL_TOKENS,
    SYSTEM,
    TRAIN_ON_CHOICES,
    USER,
    ChatTemplate,
    Message,
    normalize_role,
    parse_conversation,
)
from lumina_ds.data.loader import BatchIterator, ChatDataset, PackedDataset, build_datasets, load_chat_dataset
from lumina_ds.data.packing import PackedRows, pack_conversations
from lumina_ds.data.reader import ReadResult, SkippedLine, iter_conversations, parse_line, read_conversations
from lumina_ds.data.sampler import ShardedSampler
from lumina_ds.data.tokenizer import ChatTokenizer, conversation_texts, train_bpe_tokenizer

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
    "BatchIterator",
    "ChatDataset",
    "ChatTemplate",
    "ChatTokenizer",
    "Message",
    "PackedDataset",
    "PackedRows",
    "ReadResult",
    "ShardedSampler",
    "SkippedLine",
    "build_datasets",
    "conversation_texts",
    "iter_conversations",
    "load_chat_dataset",
    "normalize_role",
    "pack_conversations",
    "parse_conversation",
    "parse_line",
    "read_conversations",
    "train_bpe_tokenizer",
]
