"""The Hugging Face boundary at ~1B parameters on CPU: host memory of a ZeRO-3 `--init-from` (2 ranks), and the
MB/s of `import-hf` and `export`.

    python benchmarks/hf_boundary.py [--dir /tmp/hfb] [--layers 12] [--verify]

Writes a random Qwen3-MoE model directory (fp32 safetensors, 1 GB shards), then:
1. two processes build the model partitioned at ZeRO-3 (expert-parallel size 2) and load the weights module by module
   with `load_initial_weights`; each samples its resident memory every 2 ms: peak growth over the partitioned model;
2. `import-hf` of the directory (MB/s written), and `export` of the imported run (bf16; MB/s; verified with --verify).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lumina_ds.models.config import ModelConfig, MoEConfig  # noqa: E402
from lumina_ds.models.counting import count_parameters  # noqa: E402
from lumina_ds.models.transformer import Transformer  # noqa: E402

GB = 10**9


def model_config(layers: int) -> ModelConfig:
    """~1B total parameters, Qwen3-MoE shaped: q/k norm per head, 16 experts of which 2 are active."""
    moe = MoEConfig(num_experts=16, top_k=2, expert_intermediate_size=1024, norm_topk_prob=True)
    return ModelConfig(vocab_size=32000, hidden_size=1536, num_layers=layers, num_heads=12, num_kv_heads=4,
                       intermediate_size=4096, max_seq_len=2048, attention_head_dim=128, qk_norm="head",
                       tie_embeddings=False, moe=moe)  # fmt: skip


def write_hf_dir(config: ModelConfig, directory: Path) -> None:
    from lumina_ds.hf.architectures import hf_config_from_model
    from lumina_ds.hf.weights import ours_to_hf
    from lumina_ds.run_dir import write_shards
    from lumina_ds.tokenizer.chat_tokenizer import train_bpe_tokenizer

    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Transformer(config).named_parameters()}
    arch = "Qwen3MoeForCausalLM"

    def read(name: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return torch.randn(shapes[name], generator=generator) * 0.02

    directory.mkdir(parents=True)
    write_shards(ours_to_hf(config, arch, list(shapes), read), directory, max_shard_bytes=GB)
    (directory / "config.json").write_text(json.dumps(hf_config_from_model(config, arch=arch), indent=2))
    texts = [line for line in (ROOT / "examples" / "conversations.jsonl").read_text().splitlines()[:2000]]
    train_bpe_tokenizer(texts, vocab_size=2048).save(directory / "tokenizer.json")


LOAD = textwrap.dedent(
    """
    import json, os, sys, threading, time
    from pathlib import Path
    import torch.multiprocessing as mp

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def worker(rank, src, out, port):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
        import torch
        from lumina_ds.config.run import RunConfig
        from lumina_ds.distributed.env import barrier, init_distributed
        from lumina_ds.hf.source import open_model_source
        from lumina_ds.training.engine import build_model
        from lumina_ds.training.init_from import load_initial_weights

        torch.set_num_threads(1)
        info = init_distributed()
        source = open_model_source(src)
        run = RunConfig()
        run.model = source.model
        run.distributed.zero_stage, run.distributed.expert_parallel_size = 3, 2
        run.train.precision = "fp32"
        model = build_model(run, world_size=2, precision="fp32")
        barrier()
        base, peak, done = rss(), [0], threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.002)
        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.perf_counter()
        copied = load_initial_weights(model, source, rank=rank)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        Path(out, f"rank{rank}.json").write_text(json.dumps({"base": base, "peak_growth": max(peak[0], rss()) - base,
                                                             "copied": copied, "seconds": seconds}))
        barrier()

    if __name__ == "__main__":
        mp.start_processes(worker, args=tuple(sys.argv[1:3]) + (int(sys.argv[3]),), nprocs=2, start_method="spawn")
    """
)


def zero3_load(hf_dir: Path, work: Path) -> list[dict[str, float]]:
    script, out = work / "load.py", work / "load"
    script.write_text(LOAD)
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    port = str(29500 + os.getpid() % 1000)
    subprocess.run([sys.executable, str(script), str(hf_dir), str(out), port], env=env, check=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/hf_boundary", help="work directory (emptied first)")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers (12: ~1B parameters)")
    parser.add_argument("--verify", action="store_true", help="verify the export with transformers (2 fp32 models)")
    args = parser.parse_args()
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = model_config(args.layers)
    counts = count_parameters(config)
    model_bytes = counts.total * 4
    hf_dir = work / "hf"
    start = time.perf_counter()
    write_hf_dir(config, hf_dir)
    print(f"model: {counts.total / 1e9:.2f}B parameters ({model_bytes / GB:.2f} GB fp32); "
          f"HF dir written in {time.perf_counter() - start:.0f} s")  # fmt: skip
    for rank, result in enumerate(zero3_load(hf_dir, work)):
        print(f"ZeRO-3 init-from rank {rank}: peak host growth {result['peak_growth'] / GB:.2f} GB "
              f"({result['peak_growth'] / model_bytes:.0%} of the model), {result['copied']:,} weights copied "
              f"in {result['seconds']:.0f} s")  # fmt: skip
    from lumina_ds.hf.export import export_run
    from lumina_ds.hf.importer import import_hf

    report = import_hf(hf_dir, work / "run")
    print(f"import-hf: {report.bytes_written / GB:.2f} GB in {report.seconds:.1f} s "
          f"({report.bytes_written / 1e6 / report.seconds:,.0f} MB/s)")  # fmt: skip
    exported = export_run(work / "run", work / "export", verify=args.verify)
    check = exported.verification
    print(f"export (bf16): {exported.bytes_written / GB:.2f} GB in {exported.seconds:.1f} s "
          f"({exported.mb_per_s:,.0f} MB/s)"
          + (f"; verified: max |logit difference| {check.max_abs_diff:.2e}" if check else ""))  # fmt: skip


if __name__ == "__main__":
    main()
