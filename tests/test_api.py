"""The Python API (`toolchain.build`, `slice`, `export`, ...): the README's example runs as written,
results carry the stages' reports, mistakes raise the CLI's typed errors, and `import toolchain`
stays light. Model cards: tests/test_model_cards.py."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_MARK = "<!-- python-api-example -->"
MODEL_LINE = re.compile(r'^model = "smollm2-135m"', re.MULTILINE)


def readme_example() -> str:
    """The fenced Python block right after EXAMPLE_MARK in README.md."""
    text = (ROOT / "README.md").read_text()
    assert text.count(EXAMPLE_MARK) == 1
    block = re.match(r"\s*```python\n(.*?)\n```", text.split(EXAMPLE_MARK)[1], re.DOTALL)
    assert block, "the README's Python API example is not a ```python block after its marker"
    return block.group(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    # room for the default calibration windows (256 tokens), which the README's example uses
    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("api") / "tiny-llama", max_position_embeddings=512)


def test_readme_python_example_runs(checkpoint, tmp_path, monkeypatch):
    code, substituted = MODEL_LINE.subn(f"model = {str(checkpoint)!r}", readme_example())
    assert substituted == 1  # only the model name changes: the rest is the README's code
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})  # noqa: S102
    printed = out.getvalue()
    report = json.loads((tmp_path / "builds/smollm2-s30-py/sliced/compression_report.json").read_text())
    assert f"kept {report['parameters']['kept_fraction']:.1%} of the parameters; parity passed: True" in printed
    export_report = json.loads((tmp_path / "builds/smollm2-s30-fp16/export_report.json").read_text())
    assert f"fp16 export: {export_report['graph']['kind']} graph, parity passed: True" in printed
    assert "error: --slice must be in" in printed and not (tmp_path / "builds/unused").exists()
    for card in ("builds/smollm2-s30-py/sliced/README.md", "builds/smollm2-s30-fp16/README.md"):
        assert (tmp_path / card).read_text().startswith("---\n")  # each output dir got its model card


def test_build_result_holds_the_reports(checkpoint, tmp_path):
    import toolchain

    stages = []
    built = toolchain.build(str(checkpoint), tmp_path / "b", slice=0.3, nsamples=4, seqlen=32, bench=False,
                            on_stage=lambda name, event: stages.append((name, event)))
    assert isinstance(built, toolchain.Built)
    assert stages == [(s, e) for s in ("compress", "export", "validate") for e in ("start", "done")]
    assert built.manifest == json.loads((tmp_path / "b" / "manifest.json").read_text())
    parity = json.loads((tmp_path / "b" / "reports/parity/parity.json").read_text())
    assert built.reports["parity"] == parity and built.passed is parity["passed"] is True
    assert built.reports["compression"] == json.loads((tmp_path / "b/sliced/compression_report.json").read_text())
    assert built.model_dir == tmp_path / "b" / "sliced" and built.onnx_dir == tmp_path / "b" / "onnx"
    assert built.quantized_dir is None and "latency" not in built.reports  # bench=False ran no bench

    again = toolchain.build(str(checkpoint), tmp_path / "b", slice=0.3, nsamples=4, seqlen=32, bench=False)
    assert {r["status"] for r in again.manifest["stages"].values()} == {"done"}
    assert again.manifest["stages"] == built.manifest["stages"]  # resumed: nothing redone

    benched = toolchain.bench(built.path, prompts="16", batches="1", steps=2, warmup=1, repeats=1, dense=False)
    assert benched.path == tmp_path / "b" / "reports" / "latency"
    assert benched.report == json.loads((benched.path / "latency.json").read_text())
    assert {r["variant"] for r in benched.report["results"]} >= {"sliced"}
    assert all(path.is_file() for path in benched.files.values())


@pytest.mark.parametrize("call, message", [
    (lambda t, c: t.build(c, "o", slice=1.5), r"--slice must be in"),
    (lambda t, c: t.build(c, "o", slcie=0.3), r"unknown option 'slcie'; did you mean 'slice'\?"),
    (lambda t, c: t.slice(c, "o", target="onnx"), r"unknown option 'target'"),
    (lambda t, c: t.bench("o", promts="128"), r"unknown bench option 'promts'; did you mean 'prompts'\?"),
    (lambda t, c: t.export("no/such/model", "o"), r"no/such/model"),
])
def test_mistakes_raise_the_cli_typed_errors(call, message, checkpoint, tmp_path, monkeypatch):
    import toolchain

    monkeypatch.chdir(tmp_path)
    with pytest.raises(toolchain.ToolchainError, match=message) as info:
        call(toolchain, str(checkpoint))
    assert "\n" not in str(info.value) or len(str(info.value).splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_import_toolchain_and_its_api_load_no_torch():
    probe = ("import sys, toolchain\n"
             "assert callable(toolchain.build) and toolchain.Built.__name__ == 'Built'\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnxruntime', 'onnx')))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_attribute_is_an_attribute_error():
    import toolchain
    import toolchain.compress.options

    with pytest.raises(AttributeError, match="no attribute 'compres'"):
        toolchain.compres  # noqa: B018
    assert {"build", "slice", "export", "validate", "bench", "recover"} <= set(dir(toolchain))
    assert toolchain.slice.__name__ == "compress" and toolchain.slice.__module__ == "toolchain.app.api"
