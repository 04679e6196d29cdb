"""Model cards: every output dir of a build gets a README.md in the Hugging Face format whose YAML
metadata parses and whose numbers are the reports' numbers; the cards are refreshed after every build
without making a stage stale; the standalone commands write theirs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from tiny_models import save_tiny_checkpoint
from typer.testing import CliRunner

from toolchain.app.model_card import base_model, card_kind, source_license

FAST = {"slice": 0.3, "nsamples": 4, "seqlen": 32, "bench": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    # 512 positions: the eval stage scores 512-token windows
    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("cards") / "tiny-llama", max_position_embeddings=512)


@pytest.fixture(scope="module")
def built(checkpoint, tmp_path_factory) -> Path:
    import toolchain

    out = tmp_path_factory.mktemp("card-build") / "b"
    toolchain.build(str(checkpoint), out, eval="ptb", quantize="int4", deploy="genai", **FAST)
    return out


def report(path: Path) -> dict:
    return json.loads(path.read_text())


def front_matter(card: Path) -> dict:
    text = card.read_text()
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, f"{card} has no YAML front matter"
    return yaml.safe_load(match.group(1))


def table_rows(card_text: str, header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header row starts with `header`."""
    lines = card_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.parametrize("directory, library, extra_tags", [
    ("sliced", "transformers", set()),
    ("onnx", "onnxruntime", {"onnx"}),
    ("quantized", "onnxruntime", {"onnx", "int4"}),
    ("deploy", "onnxruntime-genai", {"onnx", "int4"}),
])
def test_every_output_dir_has_a_card_with_hub_metadata(built, directory, library, extra_tags):
    card = built / directory / "README.md"
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == library
    assert {"toolchain", "compressed", "slicegpt"} | extra_tags <= set(meta["tags"])
    assert "base_model" not in meta  # the source is a local dir, not a hub model
    loaded = ModelCard.load(card)  # huggingface_hub's own parser agrees
    assert loaded.data.to_dict()["library_name"] == library
    assert card_kind(built / directory) == {"sliced": "model"}.get(directory, directory.replace("deploy", "genai"))


def test_card_numbers_are_the_reports_numbers(built):
    text = (built / "sliced" / "README.md").read_text()
    compression = report(built / "sliced" / "compression_report.json")
    params = compression["parameters"]
    rows = table_rows(text, "| part | dense | compressed |")
    assert {r[0] for r in rows} == {"embeddings", "blocks", "shortcuts", "lm_head", "total"}
    for part, dense, compressed in rows:
        assert int(dense.replace(",", "")) == params["dense"][part]
        assert int(compressed.replace(",", "")) == params["compressed"][part]
    assert f"Kept {params['kept_fraction']:.1%} of the dense parameters" in text
    assert "| `slice` | `0.3` |" in text and "Method: SliceGPT." in text
    assert "`modegpt_multiple`" not in text  # MoDeGPT's settings are no part of a SliceGPT run

    dense, compressed = (report(built / "reports/eval" / f"{s}.json")["perplexity"] for s in ("dense", "compressed"))
    assert f"dense {dense['ppl']:.3f} | compressed {compressed['ppl']:.3f}" in text  # eval ran after compress
    parity = report(built / "reports/parity/parity.json")
    assert parity["passed"] and f"| PASS | logits max abs {parity['summary']['logits']['max_abs']:.3g}" in text
    quantized = report(built / "quantized" / "quantize_report.json")["parity"]
    quant_text = (built / "quantized" / "README.md").read_text()
    assert f"top-1 {quantized['top1']:.3f}" in quant_text
    assert f"perplexity {quantized['ppl_fp32']:.3f} -> {quantized['ppl_quantized']:.3f}" in quant_text


def test_card_loading_snippets_point_at_what_exists_and_run(built, monkeypatch):
    text = (built / "sliced" / "README.md").read_text()
    assert "ORTModelForCausalLM.from_pretrained('../onnx')" in text and "og.Model('../deploy')" in text
    assert "og.Model('.')" in (built / "deploy" / "README.md").read_text()
    snippet = re.search(r"transformers .*?```python\n(.*?)```", text, re.DOTALL).group(1)
    monkeypatch.chdir(built / "sliced")
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102  (the card's own code, run where the card is)
    assert scope["model"].config.model_type == "sliced_decoder" and scope["tokenizer"]("the cat").input_ids


def test_cards_are_refreshed_without_making_stages_stale(built, checkpoint, tmp_path):
    import shutil

    import toolchain

    out = tmp_path / "copy"
    shutil.copytree(built, out)
    card = out / "sliced" / "README.md"
    expected = card.read_text().replace(str(built), str(out))
    card.write_text("stale\n")
    events = []
    toolchain.build(str(checkpoint), out, eval="ptb", quantize="int4", deploy="genai",
                    on_stage=lambda name, event: events.append(event), **FAST)
    assert set(events) == {"skip"}  # a rewritten card is no changed stage output
    assert card.read_text() == expected


def test_standalone_slice_writes_its_card(checkpoint, tmp_path):
    from toolchain.app.cli import app

    result = CliRunner().invoke(app, ["slice", "--model", str(checkpoint), "--slice", "0.3", "--nsamples", "4",
                                      "--seqlen", "32", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    meta = front_matter(tmp_path / "s" / "README.md")
    assert meta["library_name"] == "transformers" and "slicegpt" in meta["tags"]
    total = report(tmp_path / "s" / "compression_report.json")["parameters"]["compressed"]["total"]
    rows = table_rows((tmp_path / "s" / "README.md").read_text(), "| part | dense | compressed |")
    assert ["total", rows[-1][1], f"{total:,}"] == rows[-1]


def test_base_model_and_license_come_from_the_source(tmp_path, monkeypatch):
    assert base_model("phi-2") == "microsoft/phi-2"  # a short name's hub id
    assert base_model("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"
    assert base_model("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    local = tmp_path / "org" / "model"
    local.mkdir(parents=True)
    assert base_model(str(local)) is None  # a local path is no hub base model, even when shaped like one
    monkeypatch.chdir(tmp_path)
    assert base_model("org/model") is None
    (local / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a model\n")
    assert source_license(str(local)) == "apache-2.0"
    assert source_license(str(tmp_path / "nothing")) is None


def test_recovered_dir_gets_a_card_with_the_recovery(built, tmp_path):
    import shutil

    from toolchain.app.model_card import write_build_cards

    out = tmp_path / "b"
    shutil.copytree(built, out)
    shutil.copytree(out / "sliced", out / "recovered")  # a recovered model dir as recover_to_dir lays it out
    recovery = {"method": "distill", "eval_ppl_before": 91.25, "best": {"eval_ppl": 80.5, "step": 3}, "steps": 4,
                "tokens_seen": 512}
    (out / "recovered" / "recover_report.json").write_text(json.dumps(recovery))
    cards = write_build_cards(out)
    assert out / "recovered" / "README.md" in cards
    text = (out / "recovered" / "README.md").read_text()
    assert "| held-out perplexity, recovery (distill) | before 91.250 | after 80.500 |" in text
    assert "recovered-distill" in front_matter(out / "recovered" / "README.md")["tags"]
    assert "from_pretrained('../recovered')" in (out / "onnx" / "README.md").read_text()  # the build's model now


def test_standalone_export_card_names_the_compression(built, tmp_path):
    from toolchain.app.cli import app

    result = CliRunner().invoke(app, ["export", str(built), "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "e" / "README.md").read_text()
    recorded = report(tmp_path / "e" / "export_config.json")["compression"]
    assert recorded["method"] == "slicegpt" and "Method: SliceGPT." in text
    assert f"| `slice` | `{recorded['slice']}` |" in text and "ORTModelForCausalLM.from_pretrained('.')" in text


def test_standalone_genai_package_gets_its_own_card(built, tmp_path):
    from toolchain.app.cli import app

    pytest.importorskip("onnxruntime_genai")
    result = CliRunner().invoke(app, ["deploy", str(built), "--genai", "--quantize", "int4", "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    meta = front_matter(tmp_path / "g" / "README.md")
    assert meta["library_name"] == "onnxruntime-genai" and {"onnx", "int4"} <= set(meta["tags"])
    text = (tmp_path / "g" / "README.md").read_text()
    assert "an onnxruntime-genai package" in text and "og.Model('.')" in text  # not the copied export's card
    parity = report(tmp_path / "g" / "quantize_report.json")["parity"]  # measured without a text: no perplexity
    assert f"| top-1 {parity['top1']:.3f} |" in text and ("ppl_fp32" in parity) == ("perplexity" in text)
