"""benchmarks/gpu_suite.py: the dry run lists every step with its command and exits 0; every command
parses with the real CLI parsers (so a renamed flag fails here, not on the GPU owner's machine); the
runner skips what the machine lacks and what depends on a failed step; the report holds measurements
against `toolchain plan`'s bound for the same GPU and shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.exceptions import TyperException

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_report
import gpu_suite


def parse_toolchain(argv: list[str]):
    """Parse `toolchain ...` the way the CLI does, without running it (typer's own click): unknown flags,
    bad values and missing arguments raise its UsageError, a TyperException."""
    from toolchain.app.cli import app

    command, name, args = typer.main.get_command(app), "toolchain", list(argv[1:])
    while hasattr(command, "list_commands"):  # a group: resolve the subcommand
        name = args.pop(0)
        command = command.get_command(typer.Context(command), name)
        assert command is not None, f"no `{name}` command"
    return command.make_context(name, args)


def test_dry_run_prints_every_step_and_exits_0(tmp_path):
    args = [sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--dry-run", "--results", str(tmp_path / "gpu")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    steps = gpu_suite.plan_steps(tmp_path / "gpu" / "builds", tmp_path / "gpu")
    for step in steps:
        assert f"] {step.name} (~{step.estimate_s}s)" in proc.stdout
        assert step.shell() in proc.stdout, step.name
        if step.log:
            assert f"{step.shell()} > {tmp_path / 'gpu' / step.log}" in proc.stdout
    assert not (tmp_path / "gpu").exists()  # a dry run writes nothing
    for part in gpu_suite.PARTS:  # each part of the environment is one line, found or missing
        assert sum(line.split(":")[0].split()[-1] == part for line in proc.stdout.splitlines()
                   if line.startswith(("found ", "missing "))) == 1


@pytest.mark.skipif(gpu_suite.probe_environment().gpu is not None, reason="a GPU is here: the default is to run")
def test_without_a_gpu_the_default_is_the_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "missing cuda: " in proc.stdout and "this is a dry run" in proc.stdout
    assert "[1/" in proc.stdout and not list(tmp_path.iterdir())


def test_every_step_command_parses_with_the_real_cli(tmp_path):
    steps = gpu_suite.plan_steps(tmp_path / "builds", tmp_path, gpu="NVIDIA H100 80GB HBM3")
    names = [s.name for s in steps]
    assert len(set(names)) == len(names)
    assert {"build-dense", "build-sliced", "build-int4", "validate-trt-dense", "validate-trt-sliced", "bench-sliced",
            "bench-dense", "bench-int4", "trtexec-sliced", "report"} <= set(names)
    for step in steps:
        assert all(after in names[:names.index(step.name)] for after in step.after), step.name
        assert step.needs <= set(gpu_suite.PARTS)
        if step.command[0] == "toolchain":
            context = parse_toolchain(list(step.command))
            if step.command[1] == "build":
                assert context.params["provider"] == "cuda" and context.params["bench"] is False
            if step.command[1] == "bench":
                assert context.params["prompts"] == "128,512,2048" and context.params["batches"] == "1,8"
        elif step.name.startswith("trtexec"):
            args = gpu_suite.build_parser().parse_args(list(step.command[2:]))
            assert args.trtexec == tmp_path / "builds" / "sliced" / "trt" and args.scratch is not None
        else:
            assert step.command[1].endswith("gpu_report.py")
            args = gpu_report.build_parser().parse_args(list(step.command[2:]))
            assert args.results == tmp_path and args.work == tmp_path / "builds"
    build = {s.name: parse_toolchain(list(s.command)).params for s in steps if s.name.startswith("build-")}
    assert build["build-dense"]["method"] == "none" and build["build-sliced"]["slice"] == 0.3
    assert build["build-dense"]["target"] == build["build-sliced"]["target"] == "trt"
    assert build["build-dense"]["dtype"] == "fp16" and build["build-int4"]["target"] == "onnx"
    assert build["build-int4"]["quantize"] == "int4" and build["build-int4"]["quant_algorithm"] == "gptq"
    assert build["build-int4"]["rotate"] == "hadamard" and build["build-int4"]["residual_bits"] == 4
    plans = [parse_toolchain(list(s.command)).params for s in steps if s.name.startswith("plan-")]
    assert {(p["batch"], p["context"]) for p in plans} == {(1, 128), (1, 512), (1, 2048), (8, 128)}
    assert {p["gpu"] for p in plans} == {"NVIDIA H100 80GB HBM3"} and all(p["as_json"] for p in plans)
    with pytest.raises(TyperException, match="No such option: --no-such-flag"):  # the check can fail
        parse_toolchain(["toolchain", "bench", "x", "--no-such-flag"])
    with pytest.raises(TyperException):
        parse_toolchain(["toolchain", "trt", "validate", "x", "--backend"])


def test_runner_skips_missing_parts_and_dependents_and_records_every_step(tmp_path, capsys):
    python = sys.executable
    steps = [gpu_suite.Step("needs-gpu", ("python", "-c", "raise SystemExit(0)"), 5, frozenset({"cuda"})),
             gpu_suite.Step("fails", (python, "-c", "raise SystemExit(3)"), 1, group="g"),
             gpu_suite.Step("logs", (python, "-c", "print('hello')"), 1, log="logs/hello.log", group="g"),
             gpu_suite.Step("after-fail", (python, "-c", "0"), 1, after=("fails",)),
             gpu_suite.Step("after-skip", (python, "-c", "0"), 1, after=("needs-gpu",))]
    env = gpu_suite.Environment(missing={"cuda": "none here"})
    records = gpu_suite.run(steps, env, tmp_path)
    status = {r["name"]: r["status"] for r in records}
    assert status == {"needs-gpu": "skipped", "fails": "failed", "logs": "ok", "after-fail": "skipped",
                      "after-skip": "skipped"}
    assert (tmp_path / "logs" / "hello.log").read_text() == "hello\n"
    saved = json.loads((tmp_path / gpu_suite.STEPS_FILE).read_text())
    assert [r["name"] for r in saved["steps"]] == [s.name for s in steps]
    assert saved["estimate_s"] == gpu_suite.wall_estimate(steps) == 5 + 1 + 1 + 1  # the group counts once
    out = capsys.readouterr().out
    assert "skip needs-gpu: needs cuda" in out and "skip after-fail: fails did not succeed" in out


def test_report_holds_measurements_against_the_plan_for_the_same_shape(tmp_path):
    from toolchain.analysis import roofline

    plan = roofline.plan(roofline.resolve_config("smollm2-135m"), gpus="h100-80gb", batch=1, context=128,
                         dtype="fp16", slice=0.3).to_dict()
    (tmp_path / "plan").mkdir()
    (tmp_path / "plan" / "fp16-b1-c128.json").write_text(json.dumps(plan))
    bench = {"results": [
        {"backend": "ort-cuda", "variant": "sliced", "phase": "decode", "dtype": "fp16", "batch": 1, "tokens": 20,
         "p50_ms": 2.0, "measured_ms": 40.0, "tokens_per_s": 500.0},
        {"backend": "ort-cuda", "variant": "sliced", "phase": "prefill", "dtype": "fp16", "batch": 1, "tokens": 128,
         "p50_ms": 3.0, "measured_ms": 3.0, "tokens_per_s": 42000.0},
        {"backend": "torch-cuda", "variant": "sliced", "phase": "decode", "dtype": "fp32", "batch": 1, "tokens": 20,
         "p50_ms": 9.0, "measured_ms": 180.0, "tokens_per_s": 111.0}], "skipped": [], "machine": {}}
    (tmp_path / "bench" / "sliced").mkdir(parents=True)
    (tmp_path / "bench" / "sliced" / "latency.json").write_text(json.dumps(bench))
    data = gpu_report.write(tmp_path, tmp_path / "builds")
    [decode, prefill] = data["plan_comparison"]  # the fp32 torch row has no fp16 plan to be held to
    bound = plan["gpus"][0]["sliced"]
    assert decode["plan_ms"] == bound["decode_ms"] and decode["x_of_bound"] == pytest.approx(2.0 / bound["decode_ms"])
    assert prefill["plan_ms"] == bound["prefill_ms"] and prefill["gpu"] == "h100-80gb"
    assert str(tmp_path / "steps.json") in data["missing"]  # what did not run is listed, not invented
    markdown = (tmp_path / gpu_report.MARKDOWN_FILE).read_text()
    assert "| sliced | ort-cuda | sliced | decode | 1 | 20 | 2.00 |" in markdown
    assert json.loads((tmp_path / gpu_report.JSON_FILE).read_text())["plots"] == ["gpu_prefill.png", "gpu_decode.png",
                                                                                 "gpu_vs_plan.png"]
