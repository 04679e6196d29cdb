"""Every GPU number of this project from one command, for whoever has the GPU.

    python benchmarks/gpu_suite.py            # on a CUDA machine: run it; elsewhere: print the plan, exit 0
    python benchmarks/gpu_suite.py --dry-run  # every step, its exact command, its time estimate
    python benchmarks/gpu_suite.py --only bench-sliced,report   # a subset (their inputs must exist)

It checks the machine first (CUDA through torch, onnxruntime's CUDA execution provider, `import
tensorrt`, `trtexec` on PATH); each missing part is one line, and the steps that need it are skipped
while the rest runs. The steps, for SmolLM2-135M dense (`--method none`), sliced 0.3 and the best int4
recipe:
  build     `toolchain build --target trt --dtype fp16 --provider cuda` for dense and sliced: the fp16
            ONNX export (onnx/, what `--target onnx --dtype fp16` writes) with its parity on ORT-CUDA
            (reports/parity), and the TensorRT bundle and engine (built in-process where TensorRT
            imports). The int4 recipe builds for `--target onnx` (int4 has no TensorRT output, and
            --quantize starts from the fp32 export). The three builds run at the same time.
  validate  each engine against the stored torch outputs (`toolchain trt validate`).
  bench     TTFT and decode at batch 1 and 8, prompts 128/512/2048 (`toolchain bench`, which alternates
            dense and compressed steps so the ratios survive load).
  trtexec   the sliced bundle's printed trtexec line, run as printed (after the benches: trtexec times
            tactics, so it must not share the GPU with a bench).
  plan      `toolchain plan --json` for the detected GPU at the benched shapes.
  report    benchmarks/results/gpu/gpu_suite.{json,md} and plots (benchmarks/gpu_report.py).
The estimates are planning figures for one H100-class GPU with 16 cores, not measurements; the report
puts each step's measured time next to its estimate.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "gpu"
STEPS_FILE = "steps.json"
MODEL = "smollm2-135m"
PROMPTS, BATCHES, DECODE_CONTEXT = (128, 512, 2048), (1, 8), 128
# The int4 recipe the README recommends (Hadamard rotation + GPTQ, 4-bit table and residual readers).
INT4_RECIPE = ("--method", "none", "--rotate", "hadamard", "--quantize", "int4", "--quant-algorithm", "gptq",
               "--quantize-embeddings", "--residual-bits", "4", "--deploy", "genai")
VARIANTS = {"dense": ("--method", "none"), "sliced": ("--slice", "0.3"), "int4": INT4_RECIPE}
PARTS = {  # environment part -> what provides it
    "cuda": "a CUDA GPU visible to torch, i.e. a CUDA build of torch and a driver",
    "ort-cuda": "onnxruntime's CUDAExecutionProvider: pip install onnxruntime-gpu in place of onnxruntime",
    "tensorrt": "the tensorrt Python package 10.x or 11.x: pip install tensorrt",
    "trtexec": "trtexec on PATH, from bin/ of TensorRT's tar or deb packages",
}


@dataclass(frozen=True)
class Step:
    """One command of the suite; the dry run prints it and the run executes it. command[0] `toolchain`
    or `python` resolves to this interpreter's environment. Consecutive steps of one `group` run at the
    same time; `log` (under the results dir) receives the output instead of the console."""

    name: str
    command: tuple[str, ...]
    estimate_s: int
    needs: frozenset[str] = frozenset()
    after: tuple[str, ...] = ()  # steps whose outputs this one reads
    log: str | None = None
    group: str | None = None

    def shell(self) -> str:
        return shlex.join(self.command)


@dataclass
class Environment:
    found: dict[str, str] = field(default_factory=dict)  # part -> what was found (version, device, path)
    missing: dict[str, str] = field(default_factory=dict)  # part -> why it is not usable
    gpu: str | None = None  # torch.cuda.get_device_name(), which `toolchain plan --gpu` resolves

    def lines(self) -> list[str]:
        return ([f"found   {part}: {what}" for part, what in self.found.items()] +
                [f"missing {part}: {why}; needs {PARTS[part]}; the steps that use it are skipped"
                 for part, why in self.missing.items()])


def probe_environment() -> Environment:
    env = Environment()
    try:
        import torch

        if torch.cuda.is_available():
            env.gpu = torch.cuda.get_device_name()
            env.found["cuda"] = f"{env.gpu} (CUDA {torch.version.cuda})"
        else:
            env.missing["cuda"] = "torch.cuda.is_available() is False"
    except Exception as err:  # noqa: BLE001 - a broken install is one line, not a traceback
        env.missing["cuda"] = f"torch does not import ({type(err).__name__})"
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" in providers:
            env.found["ort-cuda"] = f"onnxruntime {onnxruntime.__version__}"
        else:
            env.missing["ort-cuda"] = f"onnxruntime {onnxruntime.__version__} offers {', '.join(providers)}"
    except Exception as err:  # noqa: BLE001
        env.missing["ort-cuda"] = f"onnxruntime does not import ({type(err).__name__})"
    try:
        import tensorrt

        env.found["tensorrt"] = f"TensorRT {tensorrt.__version__}"
    except Exception as err:  # noqa: BLE001
        env.missing["tensorrt"] = f"import tensorrt fails ({type(err).__name__})"
    trtexec = shutil.which("trtexec")
    if trtexec:
        env.found["trtexec"] = trtexec
    else:
        env.missing["trtexec"] = "not on PATH"
    return env


def plan_steps(work: Path, results: Path, gpu: str = "all", model: str = MODEL) -> list[Step]:
    """The whole suite in run order. `gpu`: what `toolchain plan --gpu` compares with (the device name)."""
    gpu_ort = frozenset({"cuda", "ort-cuda"})
    base = ("toolchain", "build", "--model", model, "--provider", "cuda", "--no-bench", "--quiet")
    steps = [Step(f"build-{variant}", (*base, *VARIANTS[variant], *target, "--out", str(work / variant)), estimate,
                  gpu_ort, log=f"logs/build-{variant}.log", group="build")
             for variant, target, estimate in (("dense", ("--target", "trt", "--dtype", "fp16"), 150),
                                               ("sliced", ("--target", "trt", "--dtype", "fp16"), 180),
                                               ("int4", ("--target", "onnx"), 150))]
    steps += [Step(f"validate-trt-{variant}", ("toolchain", "trt", "validate", str(work / variant / "trt"), "--backend",
                                               "tensorrt", "--report", str(results / "parity" / f"{variant}-tensorrt")),
                   15, frozenset({"cuda", "tensorrt"}), (f"build-{variant}",)) for variant in ("dense", "sliced")]
    bench = ("--provider", "cuda", "--prompts", ",".join(map(str, PROMPTS)), "--batches", ",".join(map(str, BATCHES)),
             "--context", str(DECODE_CONTEXT))
    steps += [Step(f"bench-{variant}", ("toolchain", "bench", str(work / variant), *bench, dense, "--out",
                                        str(results / "bench" / variant)), estimate, gpu_ort, (f"build-{variant}",))
              for variant, dense, estimate in (("sliced", "--dense", 100), ("dense", "--no-dense", 45),
                                               ("int4", "--no-dense", 45))]
    steps.append(Step("trtexec-sliced", ("python", str(HERE / "gpu_suite.py"), "--trtexec", str(work / "sliced" / "trt"),
                                         "--scratch", str(work / "trtexec-sliced")),
                      75, frozenset({"cuda", "trtexec"}), ("build-sliced",), log="logs/trtexec-sliced.log"))
    for dtype, size in (("fp16", ("--slice", "0.3")), ("int4", ("--method", "none"))):
        for batch, context in [(1, p) for p in PROMPTS] + [(b, DECODE_CONTEXT) for b in BATCHES if b != 1]:
            steps.append(Step(f"plan-{dtype}-b{batch}-c{context}",
                              ("toolchain", "plan", "--model", model, "--gpu", gpu, "--batch", str(batch), "--context",
                               str(context), "--dtype", dtype, *size, "--json"),
                              1, log=f"plan/{dtype}-b{batch}-c{context}.json"))
    steps.append(Step("report", ("python", str(HERE / "gpu_report.py"), "--results", str(results), "--work", str(work)),
                      10))
    return steps


def wall_estimate(steps: list[Step]) -> int:
    """Seconds, counting a group of concurrent steps as its longest member."""
    groups: dict[str, int] = {}
    for step in steps:
        key = step.group or step.name
        groups[key] = max(groups.get(key, 0), step.estimate_s)
    return sum(groups.values())


def run_trtexec_line(bundle: Path, scratch: Path) -> int:
    """Run the bundle's printed trtexec line exactly as printed, from a scratch dir holding links to the
    graph, so the printed `mkdir -p` and the relative paths are what gets tested."""
    from runtime.trt_bundle import read_build_config

    line = read_build_config(bundle)["commands"]["trtexec"]
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for name in ("model.onnx", "model.onnx.data"):
        (scratch / name).symlink_to((bundle / name).resolve())
    print(line, flush=True)
    return subprocess.run(["bash", "-c", line], cwd=scratch, check=False).returncode


def resolve(command: tuple[str, ...]) -> list[str]:
    """`toolchain` and `python` from this interpreter's environment, so the suite runs what it prints."""
    head, *rest = command
    if head == "python":
        return [sys.executable, *rest]
    if head == "toolchain":
        script = Path(sys.executable).parent / "toolchain"
        return [str(script), *rest] if script.exists() else [sys.executable, "-m", "toolchain", *rest]
    return list(command)


def run(steps: list[Step], env: Environment, results: Path) -> list[dict]:
    """Run every step whose needs are present and whose inputs were produced; steps.json is rewritten
    after each step (the report step reads it; an interrupted run keeps what it did)."""
    from toolchain.core.fileio import write_json

    records: list[dict] = []
    failed: set[str] = set()
    started, total = time.time(), wall_estimate(steps)

    def save() -> None:
        write_json(results / STEPS_FILE, {"environment": {"gpu": env.gpu, "found": env.found, "missing": env.missing},
                                          "estimate_s": total, "seconds": round(time.time() - started, 1),
                                          "steps": records})

    batches: list[list[Step]] = []
    for step in steps:  # consecutive steps of one group form one concurrent batch
        if batches and step.group and batches[-1][0].group == step.group:
            batches[-1].append(step)
        else:
            batches.append([step])
    done = 0
    for batch in batches:
        running = []
        for step in batch:
            done += 1
            record = {"name": step.name, "command": step.shell(), "estimate_s": step.estimate_s}
            lacking = sorted(step.needs & set(env.missing))
            blocked = [name for name in step.after if name in failed]
            if lacking or blocked:
                reason = f"needs {', '.join(lacking)}" if lacking else f"{', '.join(blocked)} did not succeed"
                print(f"[{done}/{len(steps)}] skip {step.name}: {reason}", flush=True)
                records.append({**record, "status": "skipped", "reason": reason})
                failed.add(step.name)
                continue
            print(f"[{done}/{len(steps)}] {step.name} (~{step.estimate_s}s; suite ~{total}s): {step.shell()}",
                  flush=True)
            sink = None
            if step.log:
                (results / step.log).parent.mkdir(parents=True, exist_ok=True)
                sink = open(results / step.log, "w")  # noqa: SIM115 - closed when the process ends
            running.append((step, record, sink, time.perf_counter(),
                            subprocess.Popen(resolve(step.command), stdout=sink,
                                             stderr=subprocess.STDOUT if sink else None)))
        for step, record, sink, start, process in running:
            code = process.wait()
            if sink:
                sink.close()
            seconds = round(time.perf_counter() - start, 1)
            status = "ok" if code == 0 else "failed"
            where = f"; output in {results / step.log}" if step.log and code else ""
            print(f"    {step.name}: {status} in {seconds}s" + (f" (exit {code}{where})" if code else ""), flush=True)
            records.append({**record, "status": status, "exit_code": code, "seconds": seconds})
            if code:
                failed.add(step.name)
        save()
    return records


def print_plan(steps: list[Step], env: Environment, results: Path) -> None:
    print(f"GPU suite: {len(steps)} steps, ~{wall_estimate(steps) / 60:.1f} min estimated (one H100-class GPU, "
          "16 cores; planning figures, not measurements)")
    for i, step in enumerate(steps, 1):
        lacking = sorted(step.needs & set(env.missing))
        notes = [f"concurrent with the other {step.group} steps" if step.group else "",
                 f"would skip here: needs {', '.join(lacking)}" if lacking else ""]
        note = "; ".join(n for n in notes if n)
        sink = f" > {results / step.log}" if step.log else ""
        print(f"[{i}/{len(steps)}] {step.name} (~{step.estimate_s}s){f'  [{note}]' if note else ''}\n"
              f"    {step.shell()}{sink}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print every step and exit (the default without a GPU)")
    mode.add_argument("--run", action="store_true", help="run even without a GPU (steps needing one are skipped)")
    mode.add_argument("--trtexec", type=Path, metavar="BUNDLE", help="run BUNDLE's printed trtexec line (a step)")
    parser.add_argument("--scratch", type=Path, help="--trtexec: the dir it runs in")
    parser.add_argument("--results", type=Path, default=RESULTS, help="report dir (default benchmarks/results/gpu)")
    parser.add_argument("--work", type=Path, default=None, help="build dirs (default <results>/builds)")
    parser.add_argument("--model", default=MODEL, help=f"model to build (default {MODEL})")
    parser.add_argument("--only", default=None, help="comma-separated step names")
    return parser


def _short(path: Path) -> Path:
    """Inside the current dir: the relative path, so the printed commands stay readable."""
    path = path.resolve()
    return Path(os.path.relpath(path)) if path.is_relative_to(Path.cwd()) else path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.trtexec is not None:
        if args.scratch is None:
            print("error: --trtexec needs --scratch DIR", file=sys.stderr)
            return 2
        return run_trtexec_line(args.trtexec, args.scratch)
    results = _short(args.results)
    work = _short(args.work) if args.work else results / "builds"
    env = probe_environment()
    for line in env.lines():
        print(line)
    steps = plan_steps(work, results, gpu=env.gpu or "all", model=args.model)
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        unknown = sorted(wanted - {s.name for s in steps})
        if unknown:
            print(f"error: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(s.name for s in steps)}",
                  file=sys.stderr)
            return 2
        steps = [s for s in steps if s.name in wanted]
    if args.dry_run or (env.gpu is None and not args.run):
        if not args.dry_run:
            print("no CUDA GPU here, so this is a dry run (--run runs what it can anyway)")
        print_plan(steps, env, results)
        return 0
    results.mkdir(parents=True, exist_ok=True)
    records = run(steps, env, results)
    return 0 if all(r["status"] != "failed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
