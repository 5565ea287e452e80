"""Project errors and the one registry of their codes (docs/errors.md's table is checked against it)."""

from __future__ import annotations

# code -> what it means, as docs/errors.md says it; every LuminaError carries one of these codes
ERROR_CODES: dict[str, str] = {
    "E001": "unknown preset (the message lists the presets)",
    "E002": "invalid or incompatible options, found from the config alone: heads vs KV heads, experts vs "
    "expert-parallel size, native MoE with ZeRO-3, `--seq-len` above the model's context, a bad YAML key, "
    "a DeepSpeed JSON that sets a key the run config owns to another value than the run's (the message names the flag "
    "to use), a LuminaAI flag "
    "lumina-ds spells differently (the message says what to write)",
    "E003": "this machine cannot run the configuration: fp16 on CPU, bf16 on a GPU without it, a preset whose model "
    "states exceed GPU + host memory (`check-environment --preset`), `--attention-backend flash` without "
    "flash-attn / CUDA / bf16, `flex` for training on CPU, `mpirun` without mpi4py or `-x MASTER_ADDR/MASTER_PORT`, "
    "`--wandb` without the wandb package (`pip install lumina-ds[wandb]`), `--offload-device nvme` where DeepSpeed's "
    "AsyncIO op cannot be built (libaio missing) or `--nvme-path` is not a directory, parameters on NVMe in a single "
    "CPU process, fewer visible GPUs than ranks on a node",
    "E004": "`--model PATH` (`plan`, `analyze-memory`, `dry-run`, `estimate-time`, `ds-config`, "
    "`estimate-parameters`) names no model lumina-ds can plan: the path does not exist, its config.json is not a JSON "
    "object, or it is none of a Hugging Face model directory or config.json, a lumina-ds run directory, checkpoints "
    "directory or tag, a YAML run config (the hint lists them)",
    "E005": "a Hugging Face architecture or option lumina-ds cannot represent exactly, on import or export (the "
    "message names it and lists what is supported)",
    "E101": "a data line is not valid JSON, not a conversation, has an unknown role or roles out of order "
    "(line skipped)",
    "E102": "a data line misses required fields or has no assistant content (line skipped)",
    "E103": "a data line is not valid UTF-8 or holds U+FFFD / control characters (line skipped)",
    "E104": "an input file (training or evaluation data, tokenizer, YAML config, DeepSpeed JSON) does not exist; "
    "checked before any work starts",
    "E105": "too little data for the number of ranks (or an epoch without a usable conversation)",
    "E106": "no usable conversation in the evaluation file",
    "E107": "a checkpoint's data position does not fit this run's data: a file's content (edited in place or grown), "
    "the mixing weights, seed or `--seq-len` (the message names what differs; `--allow-changed-data` continues with a "
    "warning), or it was saved per rank, before rows were ordered globally",
    "E108": "prepared shards cannot be written (disk full, permissions): free space or pass `--prepared-dir` elsewhere",
    "E109": "prepared shards are unreadable or inconsistent: delete the directory named in the hint and prepare again",
    "E110": "a data file is not UTF-8 JSONL, named from its first bytes before any work: gzip without the `.gz` "
    "name, UTF-16/UTF-32, zstd/xz/bzip2/zip, a `.gz` that is not gzip or is damaged (the hint says how to convert it)",
    "E111": "a data line is longer than `--max-line-bytes` (line skipped without being read into memory; "
    "`--truncate-long` cuts its message contents instead)",
    "E112": "a record's format cannot be read: a record of another format than its source's (one format per file, "
    "detected from its first recognisable record or forced by `--data-format`; record skipped), or no format fits a "
    "table's columns (the message lists them; name yours with `--data-fields`)",
    "E113": "a Hugging Face dataset cannot be loaded: an `hf://` name that is not in the local cache while the hub "
    "cannot be reached (the message names the cache path, the hint how to pre-download it), an unknown split or "
    "config, or a `save_to_disk` directory that is damaged",
    "E114": "a conversation holds tool-call or tool-result turns (ShareGPT `function_call`, `observation`, `tool`), "
    "which the chat template cannot represent (record skipped)",
    "E115": "a tokenizer file cannot be read (truncated, not a tokenizer): the hint names the checkpoint copy that "
    "restores it; a resume never retrains a tokenizer",
    "E116": "a prompt (`chat`, `generate-check`) is not valid UTF-8 text",
    "E120": "a model's chat template cannot be used: it does not compile, the sandbox refused it (attribute access to "
    "Python internals, changing its inputs), or it rejects a conversation (`raise_exception`; that line is skipped)",
    "E121": "a chat template's assistant spans cannot be computed exactly: the template changes the assistant's "
    "text, renders it in more than one place, or puts no special token after it (that line is skipped; the hint says "
    "what to do)",
    "E201": "`plan`: nothing fits in GPU memory; the hint says how many nodes or which `--seq-len` would fit",
    "E202": "`plan`: a layout fits the GPUs only with more host memory than `--cpu-mem-gb` (offloaded states, "
    "or building the model)",
    "E203": "the parallel layout does not fit the number of processes (checked by `plan` and before every run): "
    "the process count is not a multiple of `--expert-parallel-size`",
    "E204": "a training step, or building the model and its DeepSpeed engine, ran out of memory; the hint names what "
    "to lower",
    "E301": "training diverged: the divergence guard kept skipping steps after its rewinds (or had no checkpoint to "
    "rewind to); with the guard off, a non-finite loss at a log line or before a checkpoint. No diverged weights are "
    "saved",
    "E303": "checkpoint missing, incomplete, corrupt, incompatible (architecture, tokenizer, ZeRO stage; a native-MoE, "
    "ZeRO-0 or NVMe-swapped checkpoint on another number of processes or expert-parallel size) or could not be saved "
    "(a full disk) or converted",
    "E304": "a file of the run directory cannot be written (disk full, permissions): metrics.jsonl, TensorBoard events",
    "E305": "another run is using this run directory: its lock (host, process, heartbeat) is a lease the run renews "
    "every 30 s; a lock whose heartbeat is older than the 5-minute lease, whose process is gone from this host or "
    "that cannot be read is taken over with a warning; `--force-unlock` breaks any lock",
    "E306": "an export failed its verification: transformers cannot load it, or its logits differ from lumina-ds' by "
    "more than 1e-4 on the probe batch (the export is left in place for inspection)",
    "E307": "`report`: a run has no metrics to draw: no metrics.jsonl at the path given, or not one complete training "
    "record in it (the run stopped before its first log line)",
    "E308": "a rank lost contact with another mid-collective (its process or host stopped): the message names the lost "
    "ranks and their host; the job stops on every rank, and a relaunch resumes from the last complete checkpoint",
}


class LuminaError(Exception):
    """A user-facing error with a stable code (one of ERROR_CODES) and a hint that says what to change."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        assert code in ERROR_CODES, f"unregistered error code {code}"
        self.code = code
        self.message = message
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"[{self.code}] {self.message}"
        return text + (f"\nHint: {self.hint}" if self.hint else "")


class ConfigError(LuminaError):
    """E0xx: invalid preset, incompatible options, hardware that cannot run the config."""


class DataError(LuminaError):
    """E1xx: malformed dataset lines, missing fields, encoding problems."""


class MemoryPlanError(LuminaError):
    """E2xx: the configuration does not fit in GPU, host or optimizer memory, or not on this many processes."""


class TrainingError(LuminaError):
    """E30x: divergence, gradient overflow."""


class CheckpointError(LuminaError):
    """E303: missing, corrupt or incompatible checkpoints."""
