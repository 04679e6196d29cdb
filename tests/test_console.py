"""What a user sees: `toolchain build` prints only our own lines (no library bars, warnings or logs
unless --verbose), and ends with a headline whose numbers are the reports' numbers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import save_tiny_checkpoint
from toolchain.app.console import LIBRARY_ENV

# every line our build command writes to stderr (the progress bar draws nothing when stderr is no terminal)
OUR_STDERR = re.compile(r"(> \w+|✓ \w+|= \w+: up to date, skipped|(warning|error): .+)")
# what the libraries print when left alone: tqdm bars, transformers' bars, warnings and log records
LIBRARY_NOISE = re.compile(r"it/s\]|\d+it \[|Loading weights|Writing model shards|de-quantizing|\w+Warning\b|"
                           r"(is|are) deprecated|\[W:onnxruntime|^(WARNING|INFO)\b", re.MULTILINE)
NUMBER = r"([\d.]+)"


def toolchain(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: a new process, none of the libraries' quiet switches set beforehand."""
    env = {k: v for k, v in os.environ.items() if k not in LIBRARY_ENV and k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-m", "toolchain", *map(str, args)], check=False, capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=1800)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    checkpoint = save_tiny_checkpoint("llama", root / "tiny-llama")
    out = root / "b"
    run = toolchain("build", "--model", checkpoint, "--slice", "0.3", "--nsamples", "4", "--seqlen", "32",
                    "--out", out, "--eval", "ptb", "--quantize", "int4", "--deploy", "genai", cwd=root)
    assert run.returncode == 0, run.stderr
    return out, run, checkpoint


def test_build_prints_only_our_lines(built):
    _, run, _ = built
    stray = [line for line in run.stderr.splitlines() if line.strip() and not OUR_STDERR.fullmatch(line)]
    assert not stray, stray
    assert [line for line in run.stderr.splitlines() if line.startswith("✓ ")] == [
        f"✓ {stage}" for stage in ("compress", "export", "validate", "quantize", "deploy", "bench", "eval")]
    assert not LIBRARY_NOISE.search(run.stdout), LIBRARY_NOISE.search(run.stdout)


def test_verbose_shows_the_libraries_and_the_default_hides_them(built, tmp_path):
    out, _, _ = built
    loud = toolchain("export", out / "sliced", "--out", tmp_path / "loud", "--verbose", cwd=tmp_path)
    quiet = toolchain("export", out / "sliced", "--out", tmp_path / "quiet", cwd=tmp_path)
    assert loud.returncode == 0 and quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "Loading weights" in loud.stderr  # the switch is what hides them: this run shows them
    assert not [line for line in quiet.stderr.splitlines() if not OUR_STDERR.fullmatch(line)], quiet.stderr
    assert not LIBRARY_NOISE.search(quiet.stdout)


def test_quiet_and_json_still_work(built, tmp_path):
    out, _, checkpoint = built
    args = ["build", "--model", checkpoint, "--slice", "0.3", "--nsamples", "4", "--seqlen", "32", "--out", out,
            "--eval", "ptb", "--quantize", "int4", "--deploy", "genai"]
    quiet = toolchain(*args, "--quiet", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == "", quiet.stdout + quiet.stderr
    logged = toolchain(*args, "--json", cwd=tmp_path)
    assert logged.returncode == 0 and logged.stderr == "", logged.stderr
    events = [json.loads(line) for line in logged.stdout.splitlines()]
    assert {e["event"] for e in events if "stage" in e} == {"skip"} and events[-1]["event"] == "finished"


def _line(stdout: str, pattern: str) -> re.Match:
    match = re.search(pattern, stdout, re.MULTILINE)
    assert match, f"no line matching {pattern!r} in:\n{stdout}"
    return match


def _close(printed: str, value: float) -> bool:
    return abs(float(printed) - value) <= 0.006 * abs(value) + 0.006  # printed with 3 significant digits


def test_headline_latency_is_the_bench_report(built):
    out, run, _ = built
    comparisons = json.loads((out / "reports/latency/latency.json").read_text())["comparisons"]
    for variant in ("sliced", "sliced-int4"):
        rows = [c for c in comparisons if c["backend"] == "ort-cpu" and c["variant"] == variant]
        decode = min((c for c in rows if c["phase"] == "decode"), key=lambda c: (c["batch"], c["context"]))
        prefill = max((c for c in rows if c["phase"] == "prefill" and c["batch"] == 1), key=lambda c: c["tokens"])
        for row, what in ((decode, f"decode ms/token, batch {decode['batch']}"),
                          (prefill, f"TTFT ms, {prefill['tokens']}-token prompt")):
            m = _line(run.stdout, rf"^  ort-cpu {variant}: {what}: dense {NUMBER} -> {NUMBER} = {NUMBER}x "
                                  rf"\(ideal {NUMBER}x\)$")
            dense, ms, ratio, ideal = m.groups()
            assert _close(dense, row["dense_ms"]) and _close(ms, row["sliced_ms"]), (m.group(0), row)
            assert _close(ratio, row["latency_ratio"]) and _close(ideal, row["ideal_ratio"]), (m.group(0), row)


def test_headline_perplexity_sizes_and_reports(built):
    out, run, _ = built
    dense, compressed = (json.loads((out / f"reports/eval/{name}.json").read_text())["perplexity"]["ppl"]
                         for name in ("dense", "compressed"))
    m = _line(run.stdout, rf"^perplexity on ptb \(.*\): dense {NUMBER} -> compressed {NUMBER} ")
    assert _close(m.group(1), dense) and _close(m.group(2), compressed)
    quantized = json.loads((out / "quantized/quantize_report.json").read_text())["parity"]
    m = _line(run.stdout, rf"^int4 vs fp32 \(.*\): perplexity {NUMBER} -> {NUMBER}, top-1 agreement {NUMBER}$")
    assert _close(m.group(1), quantized["ppl_fp32"]) and _close(m.group(2), quantized["ppl_quantized"])
    sizes = _line(run.stdout, r"^size on disk: (.*)$").group(1)
    for name in ("sliced", "onnx", "quantized", "deploy"):
        size = sum(p.stat().st_size for p in (out / name).rglob("*") if p.is_file())
        amount, unit = re.search(rf"\b{name}/ ([\d.,]+) (KB|MB)", sizes).groups()
        assert abs(float(amount.replace(",", "")) * {"KB": 2**10, "MB": 2**20}[unit] - size) <= 0.05 * 2**20, name
    reports = _line(run.stdout, r"^reports in (.*): (.*)$")
    assert Path(reports.group(1)) == out
    for path in reports.group(2).split(", "):
        assert (out / path).is_file(), path
    assert "reports/latency/latency.md" in reports.group(2) and "reports/eval/compressed.md" in reports.group(2)
