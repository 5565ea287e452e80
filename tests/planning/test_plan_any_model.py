"""`--model PATH` in place of `--preset` for every planning command: a Hugging Face model directory or its config.json,
a lumina-ds run directory or tag, or a YAML run config, read from config files alone; `train --init-from PATH` takes
the layout `plan --model PATH` chooses for the machine it starts on; the README's table of published models is what
its generator prints."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from lumina_ds.cli import main, parse
from lumina_ds.hf.model_path import model_of_path
from lumina_ds.hf.source import open_model_source
from tests.runs import EXAMPLES, ROOT, TRAIN

PUBLISHED = EXAMPLES / "published_configs"
QWEN3_MOE = PUBLISHED / "Qwen3-30B-A3B"
OLMOE = PUBLISHED / "OLMoE-1B-7B-0924"
H100_NODE = ["--nodes", "1", "--gpus-per-node", "8", "--gpu", "h100"]
H100_GIB = 79.1  # an 80 GB H100 as torch reports it


def lumina(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def plan_json(model: Path | str, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    code, out, err = lumina(["plan", "--model", str(model), *H100_NODE, "--json", *extra], capsys)
    assert code == 0, err
    return dict(json.loads(out))


def chosen_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("chosen: ")).removeprefix("chosen: ")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama as transformers saves it (weights, config.json), with a tokenizer.json whose ids fit."""
    pytest.importorskip("transformers")
    from tests.data.hf_templates import TEXTS, family_tokenizer
    from tests.hf.tiny_models import hf_config, hf_model, saved

    directory = tmp_path_factory.mktemp("tiny_llama")
    saved(hf_model("LlamaForCausalLM", hf_config("LlamaForCausalLM", vocab_size=160)), directory)
    family_tokenizer("metaspace", ["<s>", "</s>"], TEXTS, vocab_size=120).save(str(directory / "tokenizer.json"))
    return directory


# ---- what a path names ---------------------------------------------------------------------------------------------
def test_a_published_config_alone_plans_qwen3_30b_a3b_on_one_h100_node(capsys: pytest.CaptureFixture[str]) -> None:
    """The directory holds config.json and no weights; the layout keeps 10% of each GPU free, or E202 says what fits."""
    assert [p.name for p in QWEN3_MOE.iterdir()] == ["config.json"]
    code, out, err = lumina(["plan", "--model", str(QWEN3_MOE), *H100_NODE, "--json"], capsys)
    if code != 0:
        assert "[E202]" in err and "Hint: " in err and "--nodes 2" in err
        return
    result = json.loads(out)
    assert result["model"] == str(QWEN3_MOE) and "preset" not in result
    assert result["seq_len"] == 4096  # its context is 40,960: capped as for the presets
    assert result["chosen"]["memory"]["gpu_total_gib"] <= 0.9 * H100_GIB
    assert result["chosen"]["memory"]["host_total_gib_per_node"] <= 0.9 * 1024
    assert result["global_batch"] == 8 * 8  # train's 8 rows per GPU per step without --preset


def test_the_config_json_and_its_directory_plan_alike(capsys: pytest.CaptureFixture[str]) -> None:
    by_dir = plan_json(OLMOE, capsys)
    by_file = plan_json(OLMOE / "config.json", capsys)
    assert by_dir["chosen"] == by_file["chosen"] and by_dir["seq_len"] == 4096  # OLMoE's own context
    code, out, _ = lumina(["plan", "--model", str(OLMOE), *H100_NODE], capsys)
    assert code == 0 and out.startswith(f"model {OLMOE}, planned as `train --init-from {OLMOE}` fine-tunes it")
    assert f"plan for {OLMOE} on 1x8 H100 79.1 GiB" in out


def test_seq_len_defaults_to_the_context_and_the_flag_sets_it(
    tiny_hf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert plan_json(tiny_hf, capsys)["seq_len"] == 64  # the tiny model's max_position_embeddings, below 4096
    assert plan_json(OLMOE, capsys, "--seq-len", "1024")["seq_len"] == 1024
    code, _, err = lumina(["plan", "--model", str(OLMOE), *H100_NODE, "--seq-len", "8192"], capsys)
    assert code == 1 and "[E002] seq_len=8192 is longer than the model's context of 4096 tokens" in err


def test_a_run_directory_and_its_tag_plan_the_imported_model(
    tiny_hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "imported"
    assert main(["import-hf", str(tiny_hf), "--output", str(run_dir)]) == 0
    tag = run_dir / "checkpoints" / "step_00000000"
    for path in (run_dir, run_dir / "checkpoints", tag):
        assert model_of_path(path) == open_model_source(path).model  # what --init-from would train
    assert model_of_path(tiny_hf) == open_model_source(tiny_hf).model
    capsys.readouterr()
    expected = plan_json(tiny_hf, capsys)["chosen"]
    assert plan_json(run_dir, capsys)["chosen"] == expected
    assert plan_json(tag, capsys)["chosen"] == expected


def test_a_yaml_run_config_plans_with_its_own_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b7 = tmp_path / "b7.yaml"
    b7.write_text(yaml.safe_dump({"preset": "b7"}))
    code, out, _ = lumina(["plan", "--preset", "b7", *H100_NODE], capsys)
    assert code == 0
    code, by_yaml, _ = lumina(["plan", "--model", str(b7), *H100_NODE], capsys)
    assert code == 0 and chosen_line(by_yaml) == chosen_line(out)
    assert "planned as `train --config-file" in by_yaml
    fine_tune = tmp_path / "olmoe.yaml"
    fine_tune.write_text(yaml.safe_dump({"checkpoint": {"init_from": str(OLMOE)}, "train": {"micro_batch_size": 2}}))
    assert plan_json(fine_tune, capsys)["global_batch"] == 2 * 8  # the file's rows per GPU (and accumulation 1)
    counts = [lumina(["estimate-parameters", "--model", str(m), "--json"], capsys)[1] for m in (fine_tune, OLMOE)]
    assert json.loads(counts[0])["total"] == json.loads(counts[1])["total"]  # the model of its init_from


# ---- every planning command ----------------------------------------------------------------------------------------
def test_estimate_parameters_counts_the_published_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = lumina(["estimate-parameters", "--model", str(QWEN3_MOE / "config.json"), "--json"], capsys)
    counted = json.loads(out)
    assert code == 0 and counted["model"] == str(QWEN3_MOE / "config.json")
    assert round(counted["total"] / 1e9, 1) == 30.5  # Qwen's model card: 30.5B in total, 3.3B activated
    assert 3.3e9 <= counted["active"] < 3.5e9
    code, out, _ = lumina(["estimate-parameters", "--model", str(QWEN3_MOE)], capsys)
    assert code == 0 and out.startswith(f"model {QWEN3_MOE}: 30,5")


def test_analyze_memory_dry_run_estimate_time_and_ds_config_take_a_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = str(OLMOE)
    code, out, _ = lumina(["analyze-memory", "--model", model, "--zero-stage", "3", "--gpus", "8", "--json"], capsys)
    assert code == 0 and json.loads(out)["model"] == model and json.loads(out)["gpu_total_gib"] > 0
    code, out, err = lumina(["dry-run", "--model", model, *H100_NODE], capsys)
    assert code == 0, err
    assert out.startswith(f"{model}: 6,9") and "MoE layers" in out and "DeepSpeed config: parsed by DeepSpeed" in out
    code, out, _ = lumina(["estimate-time", "--model", model, "--train-data", TRAIN, "--gpus", "8", "--json"], capsys)
    assert code == 0 and json.loads(out)["model"] == model and json.loads(out)["seconds"] > 0
    code, out, _ = lumina(["ds-config", "--model", model, *H100_NODE], capsys)
    meta = json.loads(out)["lumina_ds"]
    assert code == 0 and meta["model"] == model and "preset" not in meta
    assert meta["generated_by"].startswith(f"lumina-ds ds-config --model {model} --nodes 1 --gpus-per-node 8")
    chosen = plan_json(OLMOE, capsys)["chosen"]
    assert meta["run"]["distributed"]["zero_stage"] == chosen["zero_stage"]
    code, out, _ = lumina(["ds-config", "--model", model, *H100_NODE, "--format", "deepspeed"], capsys)
    assert code == 0 and json.loads(out)["zero_optimization"]["stage"] == chosen["zero_stage"]


# ---- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("write", "words"),
    [
        (None, "does not exist"),
        ({"notes.txt": "hello"}, "neither a config.json nor a lumina-ds config.yaml"),
        ({"config.json": "{not json"}, "cannot read it as JSON"),
        ({"config.json": "[1, 2]"}, "is a JSON list"),
    ],
    ids=["missing", "no config", "not json", "not an object"],
)
def test_a_path_that_names_no_model_is_e004_with_what_to_pass(
    write: dict[str, str] | None, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    if write is not None:
        model.mkdir()
        for name, text in write.items():
            (model / name).write_text(text)
    for command in (["plan", *H100_NODE], ["estimate-parameters"]):
        code, _, err = lumina([command[0], "--model", str(model), *command[1:]], capsys)
        assert code == 1 and "[E004]" in err and words in err and "Traceback" not in err
        assert "Hint: pass a Hugging Face model directory or its config.json" in err


def test_an_architecture_lumina_ds_cannot_build_is_e005(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    code, _, err = lumina(["plan", "--model", str(tmp_path), *H100_NODE], capsys)
    assert code == 1 and "[E005] architecture GPT2LMHeadModel is not supported" in err


def test_preset_and_model_are_one_or_the_other(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = lumina(["plan", "--preset", "b7", "--model", str(OLMOE), *H100_NODE], capsys)
    assert code == 1 and "[E002] --preset and --model both given" in err
    code, _, err = lumina(["plan", *H100_NODE], capsys)
    assert code == 1 and "[E002] no model to plan" in err and "--model PATH" in err
    code, _, err = lumina(["plan", "--preset", str(OLMOE), *H100_NODE], capsys)  # a path where a preset goes
    assert code == 1 and "[E001] unknown preset" in err and f"--model {OLMOE} plans the model there" in err
    code, _, err = lumina(["ds-config", "--model", str(OLMOE)], capsys)
    assert code == 1 and "[E002] ds-config --model needs --nodes" in err
    code, out, _ = lumina(["estimate-parameters", "--json"], capsys)
    assert code == 0 and json.loads(out)["preset"] == "debug"  # still the default without either


# ---- train --init-from: the same plan at launch ----------------------------------------------------------------------
def h100_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process launched as 8 ranks of one node of 80 GB H100s with 1 TB of host memory."""
    from lumina_ds.distributed import ds_config
    from lumina_ds.planning import launch_gate

    node = launch_gate.Machine(8, 8, H100_GIB, 1024.0, "h100")
    monkeypatch.setattr(launch_gate, "this_machine", lambda **_: node)
    monkeypatch.setattr(ds_config, "select_precision", lambda requested: "mixed_bf16")  # an H100's `auto`


def test_init_from_prints_and_takes_the_layout_plan_model_shows(
    tiny_hf: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lumina_ds.cli.train import resolve_run

    code, out, _ = lumina(["plan", "--model", str(tiny_hf), *H100_NODE], capsys)
    assert code == 0
    planned = chosen_line(out)
    h100_node(monkeypatch)
    run = resolve_run(parse(["train", "--init-from", str(tiny_hf), "--train-data", TRAIN]), world_size=8,
                      ranks_per_node=8)  # fmt: skip
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("launch-time plan for")]
    assert f"launch-time plan for {tiny_hf} on 1x8 H100 79.1 GiB, host 1024 GiB: {planned}, " in line
    result = plan_json(tiny_hf, capsys)["chosen"]
    assert (run.distributed.zero_stage, run.train.micro_batch_size, run.train.grad_accum) == (
        result["zero_stage"], result["micro_batch_size"], result["grad_accum"])  # fmt: skip
    assert run.train.activation_checkpointing == result["activation_checkpointing"]


def qwen3_moe_at_launch(flags: list[str], explicit: set[str]) -> tuple[Any, str | None]:
    """`train --init-from <Qwen3-30B-A3B> FLAGS` at its launch-time plan on one 8-GPU H100 node (the model taken from
    the config.json alone: the directory has no weights to open)."""
    from lumina_ds.cli.train import run_config_from_args
    from lumina_ds.planning.launch_gate import Machine
    from lumina_ds.planning.model_launch import plan_model_at_launch

    run = run_config_from_args(parse(["train", "--init-from", str(QWEN3_MOE), *flags]))
    run.model = model_of_path(QWEN3_MOE)  # what adopt_init_source takes from the source
    node = Machine(8, 8, H100_GIB, 1024.0, "h100")
    return run, plan_model_at_launch(run, node, precision="mixed_bf16", explicit=explicit, name=str(QWEN3_MOE))


def test_the_launch_plan_of_qwen3_30b_a3b_is_plans(capsys: pytest.CaptureFixture[str]) -> None:
    from lumina_ds.errors import MemoryPlanError

    code, out, _ = lumina(["plan", "--model", str(QWEN3_MOE), *H100_NODE], capsys)
    if code != 0:
        with pytest.raises(MemoryPlanError, match="on this machine"):
            qwen3_moe_at_launch([], set())
        return
    run, line = qwen3_moe_at_launch([], set())
    assert line is not None and f": {chosen_line(out)}, " in line
    assert run.distributed.deepspeed["zero_optimization"]["reduce_bucket_size"] > 0  # the buckets it was planned with


def test_expert_parallelism_8_given_at_launch_stays(capsys: pytest.CaptureFixture[str]) -> None:
    """Public reports fine-tune Qwen3-30B-A3B on one 8xH100 node with expert parallelism 8: given as a flag, it is
    kept and the rest of the layout planned around it (or the refusal names the flag)."""
    from lumina_ds.errors import MemoryPlanError

    try:
        run, line = qwen3_moe_at_launch(["--expert-parallel-size", "8"], {"expert_parallel_size"})
    except MemoryPlanError as err:
        assert "--expert-parallel-size as given" in err.message and "drop --expert-parallel-size" in err.hint
        return
    assert line is not None and " EP 8 " in line and run.distributed.expert_parallel_size == 8
    assert "the fastest with --expert-parallel-size as given" in line


def test_layout_flags_nothing_fits_with_are_named_in_the_refusal() -> None:
    from lumina_ds.errors import MemoryPlanError

    with pytest.raises(MemoryPlanError) as zero0:  # 30.5B x 16 bytes of model states on every GPU
        qwen3_moe_at_launch(["--zero-stage", "0"], {"zero_stage"})
    assert zero0.value.code == "E201" and "does not fit with --zero-stage as given" in zero0.value.message
    assert zero0.value.hint.startswith("drop --zero-stage: `lumina-ds plan --model")
    with pytest.raises(MemoryPlanError) as ep3:  # 3 divides neither 128 experts nor 8 GPUs
        qwen3_moe_at_launch(["--expert-parallel-size", "3"], {"expert_parallel_size"})
    assert "no layout the planner weighs has --expert-parallel-size as given" in ep3.value.message


# ---- the README's table --------------------------------------------------------------------------------------------
def plan_table() -> ModuleType:
    path = PUBLISHED / "plan_table.py"
    spec = importlib.util.spec_from_file_location("plan_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_table_is_what_its_generator_prints() -> None:
    generator = plan_table()
    readme, table = (ROOT / "README.md").read_text(), generator.table()
    assert "python examples/published_configs/plan_table.py" in readme
    assert generator.with_table(readme, table) == readme, (
        "README.md's table of published models is out of date: regenerate it with "
        "`python examples/published_configs/plan_table.py`"
    )
    rows = table.splitlines()[2:]
    assert len(rows) == 8 * 2 and all(r.count(" | ") == 5 for r in rows)


def test_the_generator_rewrites_only_its_table() -> None:
    generator = plan_table()
    readme = f"# x\n\nbefore\n{generator.BEGIN}\nold\n{generator.END}\nafter\n"
    assert generator.with_table(readme, "new") == f"# x\n\nbefore\n{generator.BEGIN}\nnew\n{generator.END}\nafter\n"
