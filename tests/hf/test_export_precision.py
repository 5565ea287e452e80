"""Export keeps the precision it was given: by default the dtype the checkpoint stores, and what a chosen dtype's
rounding costs is measured against the original model, never against a copy rounded the same way.

In process, on the tiny random Llama of tests/hf/tiny_models.py (odd sizes, head_dim apart), imported as a user
imports a hub download."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lumina_ds.hf.export import export_run
from lumina_ds.hf.importer import import_hf
from lumina_ds.hf.source import open_run_source, stored_dtype
from lumina_ds.hf.verify import TOLERANCE, probe_batch
from lumina_ds.run_dir import CHECKPOINTS_DIR
from lumina_ds.tokenizer import ChatTokenizer
from tests.data.hf_templates import CHATML_SPECIALS, family_tokenizer
from tests.hf.tiny_models import hf_config, hf_model, probe
from tests.integration.test_hf_boundary import CHATML, chat_texts

transformers = pytest.importorskip("transformers")

ARCH = "LlamaForCausalLM"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A byte-level BPE with ChatML's special tokens and template, as transformers saves one."""
    trained = family_tokenizer("bytelevel", CHATML_SPECIALS, chat_texts(), vocab_size=420)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=trained, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")  # fmt: skip
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def original(tokenizer: Any) -> Any:
    """The fp32 transformers model every figure below is measured against."""
    stop, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    return hf_model(ARCH, hf_config(ARCH, vocab_size=431, eos_token_id=stop, pad_token_id=pad, bos_token_id=None))


def imported(model: Any, tokenizer: Any, directory: Path) -> Path:
    """`model` saved as a hub download (in its own dtype) with the tokenizer, then imported: the run directory."""
    model.save_pretrained(str(directory / "hf"))
    tokenizer.save_pretrained(str(directory / "hf"))
    return import_hf(directory / "hf", directory / "run").run_dir


@pytest.fixture(scope="module")
def fp32_run(original: Any, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return imported(original, tokenizer, tmp_path_factory.mktemp("fp32"))


def tensor_dtypes(directory: Path) -> set[torch.dtype]:
    return {t.dtype for f in directory.glob("*.safetensors") for t in load_file(str(f)).values()}


def exported_logits(out_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the export as a user loads it: transformers, fp32."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def original_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def test_an_fp32_import_exports_fp32_by_default_and_equals_the_original(
    fp32_run: Path, original: Any, tmp_path: Path
) -> None:
    report = export_run(fp32_run, tmp_path / "export")
    assert (report.dtype, report.stored_dtype) == ("fp32", "fp32")
    assert tensor_dtypes(report.out_dir) == {torch.float32}
    assert json.loads((report.out_dir / "config.json").read_text())["torch_dtype"] == "float32"
    check = report.verification
    assert check is not None and check.rounding_loss == 0.0 and check.max_abs_diff <= TOLERANCE
    ids, _ = probe()
    diff = (exported_logits(report.out_dir, ids) - original_logits(original, ids)).abs().max()
    assert diff <= TOLERANCE  # against the original, not against a rounded copy of it


def test_a_bf16_source_exports_bf16_by_default_with_no_rounding_loss(
    original: Any, tokenizer: Any, tmp_path: Path
) -> None:
    run = imported(copy.deepcopy(original).to(torch.bfloat16), tokenizer, tmp_path)
    assert tensor_dtypes(run / CHECKPOINTS_DIR / "step_00000000") == {torch.bfloat16}  # stored as it came
    report = export_run(run, tmp_path / "export")
    assert (report.dtype, report.stored_dtype) == ("bf16", "bf16")
    assert tensor_dtypes(report.out_dir) == {torch.bfloat16}
    check = report.verification
    assert check is not None and check.rounding_loss == 0.0 and check.max_abs_diff <= TOLERANCE
    widened = export_run(run, tmp_path / "fp32", dtype="fp32").verification  # fp32 holds bf16 exactly
    assert widened is not None and widened.rounding_loss == 0.0 and widened.max_abs_diff <= TOLERANCE


def test_a_bf16_export_of_an_fp32_model_reports_the_loss_a_user_measures(
    fp32_run: Path, original: Any, tmp_path: Path
) -> None:
    report = export_run(fp32_run, tmp_path / "export", dtype="bf16")
    assert (report.dtype, report.stored_dtype) == ("bf16", "fp32")
    assert tensor_dtypes(report.out_dir) == {torch.bfloat16}
    check = report.verification
    assert check is not None and check.max_abs_diff <= TOLERANCE  # the conversion itself is exact
    model = open_run_source(fp32_run).model
    tokens = ChatTokenizer.from_file(fp32_run / "tokenizer.json")
    ids = probe_batch(tokens, vocab_size=model.vocab_size, max_len=min(64, model.max_seq_len))  # the check's own
    measured = float((exported_logits(report.out_dir, ids) - original_logits(original, ids)).abs().max())
    print(f"bf16 rounding loss: reported {check.rounding_loss:.3e}, measured {measured:.3e}; "
          f"conversion error {check.max_abs_diff:.1e}")  # fmt: skip
    assert check.rounding_loss > 100 * TOLERANCE  # large enough that the comparison below says something
    # the two differ only by the conversion error and the import's (each <= TOLERANCE): nothing is hidden
    assert abs(check.rounding_loss - measured) <= 2 * TOLERANCE


def test_the_cli_prints_the_conversion_error_and_the_rounding_loss(
    fp32_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lumina_ds.cli import main

    assert main(["export", str(fp32_run), "--output", str(tmp_path / "default")]) == 0
    printed = capsys.readouterr().out
    assert f"exported {ARCH} (fp32) to" in printed  # the default: the stored dtype
    assert "verified with transformers: max |logit difference|" in printed and "the same fp32 weights" in printed
    assert "fp32 rounding changes logits by at most 0 (the checkpoint stores fp32: nothing lost)" in printed
    assert main(["export", str(fp32_run), "--output", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "verified with transformers: max |logit difference|" in printed and "the same bf16 weights" in printed
    loss = re.search(r"bf16 rounding changes logits by at most (\S+) from the stored fp32 weights", printed)
    assert loss is not None and float(loss.group(1)) > TOLERANCE and "--dtype fp32 keeps them exactly" in printed


def test_the_stored_dtype_is_the_one_that_holds_every_weight(tmp_path: Path) -> None:
    def files(*groups: dict[str, torch.dtype]) -> list[Path]:
        """One safetensors file per group, in a directory of their own."""
        directory = tmp_path / str(len(list(tmp_path.iterdir())))
        directory.mkdir()
        paths = [directory / f"{i}.safetensors" for i in range(len(groups))]
        for path, group in zip(paths, groups, strict=True):
            save_file({name: torch.zeros(3, dtype=dtype) for name, dtype in group.items()}, str(path))
        return paths

    assert stored_dtype(files({"a": torch.bfloat16, "steps": torch.int64})) == torch.bfloat16  # integers aside
    assert stored_dtype(files({"a": torch.bfloat16}, {"b": torch.float32})) == torch.float32  # the widest
    assert stored_dtype(files({"a": torch.bfloat16, "b": torch.float16})) == torch.float32  # neither holds the other
    assert stored_dtype(files({"a": torch.float16})) == torch.float16
