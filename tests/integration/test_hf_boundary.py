"""The Hugging Face boundary end to end: import-hf, chat with the model's own template, train --init-from (ZeRO-3,
expert parallel), export with its verification, against transformers' own loading, template and greedy decoding."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lumina_ds.config.io import load_config
from lumina_ds.errors import CheckpointError, ConfigError
from lumina_ds.generation import ChatSession, SamplingConfig, load_for_inference
from lumina_ds.hf.export import export_run
from lumina_ds.hf.importer import import_hf
from lumina_ds.run_dir import CHECKPOINTS_DIR, INDEX_FILE
from tests.data.hf_templates import QWEN25, family_tokenizer
from tests.runs import FAST, TRAIN, call_on_ranks, here, ranks

transformers = pytest.importorskip("transformers")  # a test dependency (requirements-dev.txt): present in CI

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPTS = ["What is the capital of France?", "Tell me a story about a dog."]


def chat_texts() -> list[str]:
    lines = (json.loads(line) for line in Path(TRAIN).read_text().splitlines()[:200] if line.strip())
    return [m["content"] for record in lines for m in record.get("messages", [])]


def make_hf_model(directory: Path, *, seed: int = 0, template: str | None = QWEN25, vocab: int = 431) -> Path:
    """A tiny Qwen3-MoE as transformers saves it: config.json, model.safetensors, tokenizer files, ChatML template."""
    tokenizer = family_tokenizer("bytelevel", CHATML_SPECIALS, chat_texts(), vocab_size=420)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")  # fmt: skip
    fast.chat_template = template
    config = transformers.Qwen3MoeConfig(
        vocab_size=vocab or tokenizer.get_vocab_size(),
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=72,
        moe_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.2,
        eos_token_id=tokenizer.token_to_id("<|im_end|>"),
        pad_token_id=tokenizer.token_to_id("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(directory))
    fast.save_pretrained(str(directory))
    return directory


def hf_greedy(model_dir: Path, messages: list[dict[str, str]], *, max_new: int) -> str:
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, experts_implementation="eager"
    ).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    prompt = torch.tensor([ids])
    out = model.generate(prompt, do_sample=False, max_new_tokens=max_new, attention_mask=torch.ones_like(prompt))
    return str(tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True))


def our_greedy(run: Path, prompt: str, *, max_new: int) -> str:
    bundle = load_for_inference(run)
    session = ChatSession(bundle, SamplingConfig(temperature=0.0, max_new_tokens=max_new))
    return session.reply(prompt)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("hf") / "tiny-qwen3-moe")


def test_import_chat_and_export_round_trip_equal_transformers(hf_dir: Path, tmp_path: Path) -> None:
    run = import_hf(hf_dir, tmp_path / "runs" / "base").run_dir
    assert load_config(run / "config.yaml").model.moe.num_experts == 4
    tag = run / CHECKPOINTS_DIR / "step_00000000"
    assert json.loads((tag / "complete.json").read_text())["weights_only"] is True
    # logits of the imported run against transformers' on the same ids
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, 431, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (load_for_inference(run).model(ids)["logits"] - theirs(input_ids=ids).logits).abs().max()
    assert diff <= 1e-5
    # greedy chat with the model's own template: the same reply as transformers' generate
    for prompt in PROMPTS:
        assert our_greedy(run, prompt, max_new=12) == hf_greedy(
            hf_dir, [{"role": "user", "content": prompt}], max_new=12
        )
    # export (fp32) is verified, and gives back exactly the tensors that came in
    report = export_run(run, tmp_path / "export", dtype="fp32", max_shard_bytes=100_000)
    assert report.verification is not None and report.verification.max_abs_diff <= 1e-4
    assert report.arch == "Qwen3MoeForCausalLM" and (report.out_dir / INDEX_FILE).is_file()
    original = load_file(str(hf_dir / "model.safetensors"))
    exported = {k: v for f in report.out_dir.glob("model-*.safetensors") for k, v in load_file(str(f)).items()}
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    generation = json.loads((report.out_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == original_eos(hf_dir)


def original_eos(hf_dir: Path) -> int:
    return int(json.loads((hf_dir / "config.json").read_text())["eos_token_id"])


def test_import_refuses_what_it_cannot_represent_and_writes_nothing(hf_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "olmoe"
    bad.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["DeepseekV3ForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"E005.*DeepseekV3ForCausalLM(.|\n)*Qwen3MoeForCausalLM"):
        import_hf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a dropped expert tensor: E303 naming it
    dropped = tmp_path / "dropped"
    dropped.mkdir()
    (dropped / "config.json").write_text((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    state.pop(name)
    from safetensors.torch import save_file

    save_file(state, str(dropped / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"E303.*experts"):
        import_hf(dropped, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_corrupt_shard_middle_is_e303(hf_dir: Path, tmp_path: Path) -> None:
    run = import_hf(hf_dir, tmp_path / "base").run_dir
    weights = run / CHECKPOINTS_DIR / "step_00000000" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    del data[len(data) // 2 : len(data) // 2 + 4096]  # a file cut in the middle
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="E303"):
        export_run(run, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_a_trained_debug_run_exports_verified_and_chats_like_transformers(shared_run: Path, workdir: Path) -> None:
    out = here(["export", str(shared_run), "--output", "hf/dbg", "--max-shard-size", "1MB"], cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "verified with transformers: max |logit difference|" in out.stdout and "MB/s" in out.stdout
    export = workdir / "hf" / "dbg"
    assert (export / INDEX_FILE).is_file() and json.loads((export / "config.json").read_text())["architectures"]
    ours = our_greedy(shared_run, PROMPTS[1], max_new=10)
    assert ours == hf_greedy(export, [{"role": "user", "content": PROMPTS[1]}], max_new=10)
    again = here(["export", str(shared_run), "--output", "hf/dbg"], cwd=workdir)
    assert again.returncode == 1 and "E002" in again.stderr  # never over an existing export


def test_resume_from_an_import_points_to_init_from(hf_dir: Path, workdir: Path) -> None:
    import_hf(hf_dir, workdir / "runs" / "base")
    args = ["train", *FAST, "--train-data", TRAIN, "--experiment-name", "ft", "--max-steps", "2"]
    resumed = here([*args, "--resume", "runs/base"], cwd=workdir)
    assert resumed.returncode == 1 and "E303" in resumed.stderr and "--init-from" in resumed.stderr
    changed = here([*args, "--init-from", "runs/base", "--num-experts", "8"], cwd=workdir)
    assert changed.returncode == 1 and "E002" in changed.stderr and "--num-experts" in changed.stderr


def load_partitioned(src: str, out: str) -> None:
    """One rank of a 2-rank job: the HF model's weights into a ZeRO-3, EP-2 partitioned model, consolidated again."""
    from lumina_ds.config.run import RunConfig
    from lumina_ds.distributed.consolidate import write_consolidated
    from lumina_ds.distributed.env import barrier, init_distributed
    from lumina_ds.hf.source import open_model_source
    from lumina_ds.training.engine import build_model
    from lumina_ds.training.init_from import load_initial_weights

    info = init_distributed()
    source = open_model_source(src)
    run = RunConfig()
    run.model = source.model
    run.distributed.zero_stage, run.distributed.expert_parallel_size = 3, 2
    run.train.precision = "fp32"
    model = build_model(run, world_size=2, precision="fp32")
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    copied = load_initial_weights(model, source, rank=info.rank)
    write_consolidated(model, Path(out), max_shard_bytes=1 << 30)
    Path(out, f"rank{info.rank}.json").write_text(json.dumps({"copied": copied, "partitioned": partitioned}))
    barrier()


def test_zero3_init_from_loads_every_weight_exactly_into_the_partitioned_model(hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "weights"
    out.mkdir()
    proc = call_on_ranks(load_partitioned, str(hf_dir), str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["partitioned"] and rank1["partitioned"]
    from lumina_ds.hf.source import open_model_source

    source = open_model_source(hf_dir)
    assert rank1["copied"] == 0 and rank0["copied"] == sum(source.read(n).numel() for n in source.names)
    loaded = load_file(str(out / "model.safetensors"))
    assert set(loaded) == set(source.names)
    assert all(torch.equal(loaded[n], source.read(n)) for n in source.names)


def test_fine_tune_of_an_imported_moe_at_zero3_ep2_exports_verified(hf_dir: Path, workdir: Path) -> None:
    args = ["--init-from", str(hf_dir), "--train-data", TRAIN, "--seq-len", "128", "--micro-batch-size", "2",
            "--zero-stage", "3", "--expert-parallel-size", "2", "--max-steps", "3", "--log-every-n-steps", "1",
            "--experiment-name", "ft", "--lr", "3e-3"]  # fmt: skip
    proc = ranks(["train", *args, "--no-progress-bar"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "runs" / "ft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (workdir / "runs" / "ft" / "chat_template.jinja").is_file()  # the model's own template came along
    out = here(["export", "runs/ft", "--output", "hf/ft"], cwd=workdir)  # its stored dtype, verified
    assert out.returncode == 0 and "verified with transformers" in out.stdout, out.stderr[-2000:]


def test_export_without_transformers_says_the_check_was_skipped(
    hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lumina_ds.cli import main

    run = import_hf(hf_dir, tmp_path / "base").run_dir
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    assert main(["export", str(run), "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "verification skipped: transformers is not installed" in printed and "MB/s" in printed
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out.exporting").exists()


def test_a_mapping_that_swaps_two_experts_fails_verification_with_e306(
    hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The silent conversion bug other stacks ship: every tensor present and well shaped, two experts swapped."""
    import lumina_ds.hf.weights as weights
    from lumina_ds.cli import main

    run = import_hf(hf_dir, tmp_path / "base").run_dir
    mapping = weights.ours_to_hf

    def swapped(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        a, b = "model.layers.0.mlp.experts.0.down_proj.weight", "model.layers.0.mlp.experts.1.down_proj.weight"
        for name, tensor in mapping(*args, **kwargs):  # type: ignore[arg-type]
            yield {a: b, b: a}.get(name, name), tensor

    monkeypatch.setattr(weights, "ours_to_hf", swapped)
    assert main(["export", str(run), "--output", str(tmp_path / "out"), "--dtype", "fp32"]) == 1
    err = capsys.readouterr().err
    assert "[E306]" in err and "max |logit difference|" in err
    assert (tmp_path / "out" / "config.json").is_file()  # left in place for inspection


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize("arch", sorted(["MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM",
                                         "OlmoeForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
                                         "Qwen2ForCausalLM", "Qwen3ForCausalLM"]))  # fmt: skip
def test_greedy_chat_of_every_imported_architecture_equals_transformers_generate(arch: str, tmp_path: Path) -> None:
    """Each architecture's tiny model (tests/hf/tiny_models.py: its options, odd sizes, windows shorter than the
    conversation) saved as a hub download is, imported, the model transformers runs: the same greedy reply."""
    from tests.hf.tiny_models import hf_config, hf_model

    tokenizer = family_tokenizer("bytelevel", CHATML_SPECIALS, chat_texts(), vocab_size=420)
    stop, pad = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
    model = hf_model(arch, hf_config(arch, vocab_size=431, eos_token_id=stop, pad_token_id=pad, bos_token_id=None))
    model.save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")  # sharded, with its index
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1 and (tmp_path / "hf" / INDEX_FILE).is_file()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")  # fmt: skip
    fast.chat_template = CHATML
    fast.save_pretrained(str(tmp_path / "hf"))
    run = import_hf(tmp_path / "hf", tmp_path / "run").run_dir
    report = export_run(run, tmp_path / "export", dtype="fp32")  # and back out, verified by transformers
    assert report.arch == arch and report.verification is not None
    print(f"{arch}: export verified, max |logit difference| {report.verification.max_abs_diff:.1e}")
    assert report.verification.max_abs_diff <= 1e-4
    prompt = "Hi! How are you?"
    assert our_greedy(run, prompt, max_new=8) == hf_greedy(tmp_path / "hf", [{"role": "user", "content": prompt}],
                                                           max_new=8)  # fmt: skip


def test_import_runs_no_code_from_the_model_directory(hf_dir: Path, tmp_path: Path) -> None:
    """auto_map and a modeling file (what trust_remote_code would run) are ignored; pickled weights are refused."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for path in hf_dir.iterdir():
        (shipped / path.name).write_bytes(path.read_bytes())
    marker = tmp_path / "code-ran"
    (shipped / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((shipped / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (shipped / "config.json").write_text(json.dumps(config))
    run = import_hf(shipped, tmp_path / "run").run_dir
    assert our_greedy(run, PROMPTS[0], max_new=3) is not None and not marker.exists()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"E303.*pytorch_model\.bin.*no safetensors"):
        import_hf(pickled, tmp_path / "out")


def test_a_base_model_whose_vocabulary_has_no_room_for_chat_tokens_is_e005(tmp_path: Path) -> None:
    """No chat template: lumina-ds' format adds 6 tokens; an embedding without spare rows cannot take them."""
    base = make_hf_model(tmp_path / "base", template=None, vocab=0)  # embedding rows = tokenizer ids
    with pytest.raises(ConfigError, match=r"E005.*no chat template.*embeddings"):
        import_hf(base, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    roomy = make_hf_model(tmp_path / "roomy", template=None, vocab=448)  # spare rows, as most models have
    run = import_hf(roomy, tmp_path / "run2").run_dir
    assert our_greedy(run, PROMPTS[0], max_new=3) is not None  # lumina-ds' own format, within the embedding
