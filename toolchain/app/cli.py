"""The `toolchain` command. Each command is a thin call into a stage function; user mistakes
(ToolchainError) become one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Optional

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from toolchain.core.errors import InvalidOptionError, ToolchainError

class OneLineUsageErrors(typer.core.TyperGroup):
    """Mistyped options and values of the wrong type print like every other user mistake: one
    `error:` line and exit code 2 (click would print a usage block and a boxed message)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as err:  # typer's (vendored) click errors: usage and parameter errors
            ctx = getattr(err, "ctx", None)
            if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:
                typer.echo(ctx.get_help())
            else:
                where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                typer.echo(f"error: {err.format_message()}{where}", err=True)
            code = err.exit_code
        except typer.Abort:
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  cls=OneLineUsageErrors,
                  help="Compress LLMs and ship them to ONNX Runtime / TensorRT with parity and latency reports.")
console = Console(stderr=True)


def user_errors(fn):
    """Turn ToolchainError into `error: <message>` and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ToolchainError as err:
            message = " ".join(str(err).split())  # one line, even when a library's message spans several
            console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code)

    return wrapper


def parse_widths(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidOptionError(f"--widths must be comma-separated integers, got {text!r}") from None


def print_parameter_table(title: str, summary: dict) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("parameters")
    table.add_column("dense", justify="right")
    table.add_column("compressed", justify="right")
    for key in ("embeddings", "blocks", "shortcuts", "lm_head", "total"):
        table.add_row(key, f"{summary['dense'][key]:,}", f"{summary['compressed'][key]:,}")
    Console().print(table)
    verdict = "smaller" if summary["smaller"] else "[bold red]LARGER than the input[/]"
    Console().print(f"kept {summary['kept_fraction']:.1%} of the parameters "
                    f"({summary['compression']:.1%} removed): {verdict}")


# weight-only quantization, shared by `build` and `deploy`
QUANT_ALGORITHM_OPTION = typer.Option("minmax", "--quant-algorithm", help="int4 blocks: minmax (fast) | hqq "
                                      "(optimised scales, slower to quantize)")
QUANT_COMPUTE_OPTION = typer.Option("int8", "--quant-compute", help="MatMulNBits activations on CPU: int8 (ORT's "
                                    "fast kernel, accuracy_level 4) | fp32 (closer to fp32 outputs, much slower)")


# calibration placement, shared by `slice` and `build`
DEVICE_OPTION = typer.Option("auto", "--device", help="Compute device for calibration/PCA: auto (CUDA when "
                             "available) | cpu | cuda | cuda:N")
STREAM_OPTION = typer.Option(True, "--stream/--no-stream", help="SliceGPT: read, slice and write one layer at a "
                             "time (bounded memory; same bytes as --no-stream)")
OFFLOAD_OPTION = typer.Option(None, "--offload-activations", help="Existing dir for the calibration activations "
                              "(files) instead of memory")


@app.command("slice")
@user_errors
def slice_command(
    model: str = typer.Option(..., "--model", "-m", help="Hub id, short name (smollm2-135m, phi-2, ...), HF dir or .gguf"),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist)"),
    slice_: float = typer.Option(0.3, "--slice", help="Fraction of the hidden width removed, in [0, 1)"),
    method: str = typer.Option("slicegpt", help="slicegpt | modegpt | slicegpt+modegpt"),
    compression: float = typer.Option(0.25, help="MoDeGPT: fraction of block parameters removed"),
    calib: str = typer.Option("ptb", help="Calibration text: ptb | wikitext2 | c4 | alpaca | a .txt/.jsonl/.parquet file"),
    nsamples: int = typer.Option(32, help="Calibration windows"),
    seqlen: int = typer.Option(256, help="Tokens per calibration window"),
    widths: Optional[str] = typer.Option(None, help="Explicit residual widths, comma-separated (one per position)"),
    rotation: str = typer.Option("pca", help="pca | random | identity (the last two are sanity baselines)"),
    slice_head: bool = typer.Option(False, "--slice-head", help="Also slice the final norm / LM head input"),
    tie: str = typer.Option("slice", help="Tied embeddings: slice (one sliced table) | project (full table + "
                            "projections) | untie (reference SliceGPT: separate head)"),
    tie_basis: str = typer.Option("joint", "--tie-basis", help="--tie slice: the shared table's rotation from the "
                                  "first residual stream and the head input (joint) | the first stream only (first)"),
    share: str = typer.Option("none", help="One rotation per group of positions, no shortcut inside a group: "
                              "none | layer (attention+MLP of a layer) | all"),
    target_params: Optional[int] = typer.Option(None, "--target-params", help="Total parameters to keep (embeddings, "
                                                "head and shortcuts included); picks the widths, overrides --slice"),
    target_ratio: Optional[float] = typer.Option(None, "--target-ratio", help="Fraction of the input's total "
                                                 "(tied) parameters to keep, e.g. 0.8; overrides --slice"),
    budget: str = typer.Option("variance", help="How a target is met: uniform (one width) | variance (one "
                               "explained-variance fraction for all positions) | global (greedy on the PCA spectra)"),
    allow_larger: bool = typer.Option(False, "--allow-larger", help="Write the result even if it is not smaller "
                                      "than the input"),
    seed: int = typer.Option(0, help="Calibration sampling seed"),
    device: str = DEVICE_OPTION,
    stream: bool = STREAM_OPTION,
    offload_activations: Optional[Path] = OFFLOAD_OPTION,
) -> None:
    """Compress a model and write a loadable HF-style model directory."""
    from toolchain.compress.stage import CompressOptions, compress_to_dir

    options = CompressOptions(model=model, method=method, slice=slice_, compression=compression,
                              widths=parse_widths(widths), rotation=rotation, slice_head=slice_head, tie=tie, calib=calib,
                              nsamples=nsamples, seqlen=seqlen, seed=seed, device=device, tie_basis=tie_basis,
                              share=share, target_params=target_params, target_ratio=target_ratio, budget=budget,
                              allow_larger=allow_larger, stream=stream,
                              offload_activations=str(offload_activations) if offload_activations else None)
    with stage_progress("compress") as progress:
        result = compress_to_dir(options, out, progress=progress)
    print_parameter_table(f"{model} → {out}", result.report["parameters"])
    size = result.report["weight_bytes"]
    Console().print(f"weights ({size['dtype']}): {size['dense'] / 1e6:,.1f} MB in, {size['compressed'] / 1e6:,.1f} MB out")
    Console().print(f"wrote {out} in {result.seconds:.1f}s")


@contextlib.contextmanager
def stage_progress(label: str):
    """A rich progress bar; yields a callback(done, total)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@app.command()
@user_errors
def plan(
    model: str = typer.Option(..., "--model", help="Short name (llama-2-70b, phi-2, opt-125m, ...), hub id, "
                                                   "checkpoint dir or config.json. Only the config is read."),
    slice: float = typer.Option(0.3, "--slice", help="SliceGPT fraction of the hidden width removed, in [0, 1)."),
    gpu: str = typer.Option("all", "--gpu", help="GPU name(s), comma-separated, or 'all'."),
    batch: int = typer.Option(1, "--batch"),
    context: int = typer.Option(4096, "--context", help="Prompt length for prefill and cache length for decode."),
    dtype: str = typer.Option("fp16", "--dtype", help="fp32 | fp16 | bf16 | int8 | int4 (weight-only)."),
    slice_head: bool = typer.Option(False, "--slice-head", help="Slice the LM head input too."),
    calibrate: Optional[Path] = typer.Option(None, "--calibrate", help="Bench JSON to fit efficiency factors."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON instead of a table."),
) -> None:
    """Will the dense and the sliced model fit on a GPU, and how fast can they be at best (from the config)."""
    import json

    from rich.table import Table

    from toolchain.analysis import roofline

    efficiency = roofline.fit_efficiency(calibrate) if calibrate is not None else None
    result = roofline.plan(roofline.resolve_config(model), slice=slice, gpus=gpu, batch=batch, context=context,
                           dtype=dtype, slice_head=slice_head, efficiency=efficiency)
    data = result.to_dict()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    out = Console()
    if not out.is_terminal:  # pipes and tests: do not squeeze the table into 80 columns
        out = Console(width=140)
    out.print(roofline.summary_line(data), highlight=False)
    if efficiency is not None:
        out.print(f"calibrated on {efficiency.gpu}: compute x{efficiency.compute:.2f}, "
                  f"bandwidth x{efficiency.bandwidth:.2f} of peak", highlight=False)
    table = Table(*roofline.TABLE_HEADER, caption="(c) compute-bound, (m) bandwidth-bound; times are lower bounds "
                  "on #GPUs with ideal tensor parallelism")
    for cells in roofline.table_rows(data):
        table.add_row(*cells)
    out.print(table)


@app.command("eval")
@user_errors
def eval_command(
    model: str = typer.Argument(..., help="Build dir (uses its sliced/ model), short name, checkpoint dir, .gguf "
                                          "file or hub id."),
    ppl: Optional[str] = typer.Option(None, "--ppl", help="Perplexity text: ptb, wikitext2, c4, alpaca or a "
                                                           ".txt/.jsonl/.parquet file (default ptb unless --tasks)."),
    split: str = typer.Option("test", "--split", help="Split of a named dataset: train, validation, test."),
    seqlen: int = typer.Option(512, "--seqlen", help="Window length in tokens (non-overlapping windows)."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="Score only the first N windows."),
    batch_size: int = typer.Option(1, "--batch-size"),
    bos: bool = typer.Option(False, "--bos", help="Put the tokenizer's BOS first in every window."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval zero-shot tasks, comma-separated "
                                                               "(needs lm-eval and cached task data)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="lm-eval: examples per task (quick checks)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write eval.json and eval.md into this directory."),
) -> None:
    """Perplexity (documented protocol) and optional lm-eval zero-shot accuracy of a model or build."""
    import platform

    import torch
    import transformers
    from rich.table import Table

    from toolchain.data.text import load_text
    from toolchain.core.errors import InvalidOptionError
    from runtime.evaluate import perplexity, write_report, zero_shot
    from toolchain.data.sources import load_hf_model, resolve_model

    for name, value in (("seqlen", seqlen), ("max-windows", max_windows), ("batch-size", batch_size),
                        ("limit", limit)):
        if value is not None and value < 1:
            raise InvalidOptionError(f"--{name} must be a positive integer, got {value}")
    if ppl is None and not tasks:
        ppl = "ptb"
    text = load_text(ppl, split) if ppl else None  # bad dataset names fail before the model loads
    build_model = Path(model).expanduser() / "sliced"
    spec = str(build_model) if (build_model / "config.json").is_file() else model
    resolved = resolve_model(spec)
    hf_model, tokenizer = load_hf_model(resolved)
    max_len = getattr(hf_model.config, "max_position_embeddings", None)
    if ppl and max_len and seqlen > max_len:
        raise InvalidOptionError(f"--seqlen {seqlen} exceeds the model's maximum of {max_len}; lower it")

    report: dict = {"model": model, "resolved": str(resolved.path), "kind": resolved.kind,
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "python": platform.python_version()}}
    out_console = Console()
    table = Table("metric", "value", title=f"eval: {model}")
    if text is not None:
        result = perplexity(hf_model, tokenizer, text, seqlen=seqlen, max_windows=max_windows,
                            batch_size=batch_size, bos=bos)
        report["perplexity"] = {"dataset": ppl, "split": split, **result}
        table.add_row(f"ppl {ppl}/{split}", f"{result['ppl']:.3f}")
        table.add_row("tokens scored", f"{result['tokens']} in {result['windows']} x {result['seqlen']}")
        table.add_row("seconds", f"{result['seconds']:.1f}")
    if tasks:
        scores = zero_shot(hf_model, tokenizer, tasks.split(","), batch_size=batch_size, limit=limit)
        report["zero_shot"] = scores
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                table.add_row(f"{task} {metric}", f"{value:.4f}")
    out_console.print(table)
    if out is not None:
        paths = write_report(out, report)
        out_console.print(f"report: {paths['json']} and {paths['markdown']}", highlight=False)


@app.command("export")
@user_errors
def export_command(
    model: str = typer.Argument(..., help="Sliced/canonical model dir, build dir (uses its sliced/), HF checkpoint "
                                          "dir or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist)."),
    target: str = typer.Option("onnx", "--target", help="onnx (KV-cache graph with optimum/genai I/O names)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | fp16 (norms, RoPE, softmax and logits stay fp32)."),
    optimize: str = typer.Option("fast", "--optimize", help="fast: ORT's fused ops (GroupQueryAttention, "
                                 "RotaryEmbedding, SkipSimplifiedLayerNormalization), checked against torch, falling "
                                 "back to basic where they cannot be exact; basic: the traced graph with ORT's norm "
                                 "fusion; none: standard ONNX ops only (e.g. for other runtimes)."),
    no_optimize: bool = typer.Option(False, "--no-optimize", help="Same as --optimize none."),
    external_data: bool = typer.Option(False, "--external-data",
                                       help="Weights in model.onnx.data (automatic past ~1.8 GB)."),
    exporter: str = typer.Option("dynamo", "--exporter", help="dynamo | torchscript (fallback if dynamo fails)."),
) -> None:
    """Export a model to ONNX with a KV cache (one graph for prefill and decode)."""
    from exporters.onnx import ExportOptions, export_onnx

    if target != "onnx":
        raise InvalidOptionError(f"--target {target!r} is not supported by `export`; use --target onnx")
    build_model = Path(model).expanduser() / "sliced"
    source = str(build_model) if (build_model / "config.json").is_file() else model
    result = export_onnx(source, out, ExportOptions(dtype=dtype, optimize="none" if no_optimize else optimize,
                                                    external_data=external_data, exporter=exporter))
    report = result.report
    graph = report.get("graph", {})
    fallback = f" (fell back: {graph['fallback_reason']})" if graph.get("fallback_reason") else ""
    Console().print(f"wrote {result.model_path} ({dtype}, opset {result.config['opset']}, {graph.get('kind', '?')} "
                    f"graph{fallback}); fused norms {report['fused_norms']}/{report['model_norms']}", highlight=False)


@app.command("validate")
@user_errors
def validate_command(
    paths: list[str] = typer.Argument(..., help="A build dir (with sliced/ and onnx/), or REFERENCE CANDIDATE: "
                                                "each a torch model dir or an ONNX file/export dir."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Tolerances: fp32 | fp16 (default: from the "
                                                              "candidate's KV-cache dtype)."),
    provider: str = typer.Option("cpu", "--provider", help="ONNX Runtime provider: cpu | cuda | tensorrt."),
    report: Optional[Path] = typer.Option(None, "--report", help="Dir for parity.json and parity.md (default: "
                                                                 "<build>/reports, or ./reports for two paths)."),
) -> None:
    """Parity of an export against its torch model; exit 0 on pass, 1 on fail (for CI)."""
    from rich.table import Table

    from runtime.validate import validate

    result = validate(paths, dtype=dtype, provider=provider, report_dir=report)
    data = result.report
    table = Table("step", "max abs", "mean abs", "cosine", "top-1", "top-5",
                  title=f"{data['candidate']} vs {data['reference']} ({data['dtype']}): logits")
    for step in data["steps"]:
        m = step["logits"]
        table.add_row(step["step"], f"{m['max_abs']:.3g}", f"{m['mean_abs']:.3g}", f"{m['cosine']:.6f}",
                      f"{m['top1']:.3f}", f"{m['top5']:.3f}")
    out = Console()
    out.print(table)
    for check in data["checks"]:
        out.print(f"{'pass' if check['passed'] else 'FAIL'}  {check['check']}: {check['value']} "
                  f"(limit {check['limit']})", highlight=False)
    out.print(f"{'PASS' if result.passed else 'FAIL'} — report: {result.json_path} and {result.markdown_path}",
              highlight=False)
    if not result.passed:
        raise typer.Exit(1)


@app.command("build")
@user_errors
def build_command(
    model: str = typer.Option(..., "--model", "-m", help="Hub id, short name (smollm2-135m, phi-2, ...), HF dir or .gguf"),
    out: Path = typer.Option(..., "--out", "-o", help="Build directory (created; an existing build resumes)"),
    slice_: float = typer.Option(0.3, "--slice", help="Fraction of the hidden width removed, in [0, 1)"),
    target: str = typer.Option("onnx", help="torch | onnx | trt"),
    method: str = typer.Option("slicegpt", help="slicegpt | modegpt | slicegpt+modegpt"),
    compression: float = typer.Option(0.25, help="MoDeGPT: fraction of block parameters removed"),
    dtype: str = typer.Option("fp32", help="ONNX precision: fp32 | fp16"),
    calib: str = typer.Option("ptb", help="Calibration text: ptb | wikitext2 | c4 | alpaca | a local file"),
    nsamples: int = typer.Option(32, help="Calibration windows"),
    seqlen: int = typer.Option(256, help="Tokens per calibration window"),
    widths: Optional[str] = typer.Option(None, help="Explicit residual widths, comma-separated"),
    rotation: str = typer.Option("pca", help="pca | random | identity"),
    slice_head: bool = typer.Option(False, "--slice-head", help="Also slice the LM head input"),
    tie: str = typer.Option("slice", help="Tied embeddings: slice | project | untie"),
    seed: int = typer.Option(0, help="Calibration sampling seed"),
    device: str = DEVICE_OPTION,
    stream: bool = STREAM_OPTION,
    offload_activations: Optional[Path] = OFFLOAD_OPTION,
    provider: str = typer.Option("cpu", help="ONNX Runtime provider for validate/bench: cpu | cuda | tensorrt"),
    bench: bool = typer.Option(True, "--bench/--no-bench", help="Run the latency benchmark stage"),
    eval_: Optional[str] = typer.Option(None, "--eval", help="Also measure perplexity (dense vs compressed) on this text"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int4 | int8: weight-only quantize the fp32 "
                                                                     "ONNX export into quantized/ (onnxruntime's "
                                                                     "MatMulNBits), with parity vs fp32"),
    block_size: int = typer.Option(32, "--block-size", help="--quantize: weights per quantization block"),
    quant_algorithm: str = QUANT_ALGORITHM_OPTION,
    quant_compute: str = QUANT_COMPUTE_OPTION,
    deploy: Optional[str] = typer.Option(None, "--deploy", help="genai | triton: package the (quantized) export "
                                                                 "under deploy/ for onnxruntime-genai or Triton"),
    force: bool = typer.Option(False, "--force", help="Redo every stage"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output"),
    json_log: bool = typer.Option(False, "--json", help="Machine-readable JSON log lines on stdout"),
) -> None:
    """Compress, export, validate and benchmark in one resumable build directory."""
    import json
    import time

    from toolchain.app.pipeline import BuildOptions, build

    options = BuildOptions(model=model, target=target, method=method, slice=slice_, compression=compression,
                           widths=parse_widths(widths), rotation=rotation, slice_head=slice_head, tie=tie, calib=calib,
                           nsamples=nsamples, seqlen=seqlen, seed=seed, device=device, dtype=dtype,
                           provider=provider, bench=bench, eval=eval_, quantize=quantize, block_size=block_size,
                           quant_algorithm=quant_algorithm, quant_compute=quant_compute, deploy=deploy, stream=stream,
                           offload_activations=str(offload_activations) if offload_activations else None)

    def on_stage(name: str, event: str) -> None:
        if json_log:
            print(json.dumps({"time": round(time.time(), 3), "stage": name, "event": event}), flush=True)
        elif not quiet:
            console.print({"skip": f"[dim]= {name}: up to date, skipped[/]", "start": f"[bold]> {name}[/]",
                           "done": f"[green]✓ {name}[/]"}[event])

    if quiet or json_log:
        manifest = build(options, out, force=force, on_stage=on_stage)
    else:
        with stage_progress("working") as progress:
            manifest = build(options, out, force=force, on_stage=on_stage, progress=progress)
    if json_log:
        print(json.dumps({"event": "finished", "out": str(out), "stages": list(manifest["stages"])}), flush=True)
    elif not quiet:
        print_build_summary(Path(out), manifest)


def print_build_summary(build_dir: Path, manifest: dict) -> None:
    import json

    from rich.table import Table

    table = Table(title=f"build {build_dir}")
    for column in ("stage", "status", "seconds", "files"):
        table.add_column(column)
    for name, record in manifest["stages"].items():
        table.add_row(name, record.get("status", "?"), str(record.get("seconds", "")), str(len(record.get("outputs", {}))))
    Console().print(table)
    for name, record in manifest["stages"].items():
        if record.get("note"):
            Console().print(f"{name}: {record['note']}", highlight=False, soft_wrap=True)
    report = build_dir / "sliced" / "compression_report.json"
    if report.exists():
        print_parameter_table("parameters", json.loads(report.read_text())["parameters"])
    parity = build_dir / "reports" / "parity" / "parity.json"
    if parity.exists():
        data = json.loads(parity.read_text())
        logits = data["summary"]["logits"]
        Console().print(f"parity {data['candidate']} vs {data['reference']}: {'PASS' if data['passed'] else 'FAIL'} "
                        f"(logits max abs {logits['max_abs']:.2e}, top-1 {logits['top1']:.3f})")


@app.command("inspect")
@user_errors
def inspect_command(build_dir: Path = typer.Argument(..., help="A build directory")) -> None:
    """Show a build's manifest: stages, options, versions, outputs."""
    from toolchain.core.errors import ArtifactError
    from toolchain.app.pipeline import MANIFEST, read_manifest

    if not (build_dir / MANIFEST).is_file():
        raise ArtifactError(f"{build_dir} has no {MANIFEST}; pass a directory made by `toolchain build`")
    manifest = read_manifest(build_dir)
    Console().print(f"[bold]{build_dir}[/] (toolchain {manifest.get('toolchain_version')})")
    Console().print("options: " + ", ".join(f"{k}={v}" for k, v in manifest.get("options", {}).items()), highlight=False)
    print_build_summary(build_dir, manifest)
    for name, record in manifest["stages"].items():
        for path, digest in record.get("outputs", {}).items():
            Console().print(f"  {record['output']}/{path}  {digest[:16]}", highlight=False)


@app.command("bench")
@user_errors
def bench_command(
    build_dir: Path = typer.Argument(..., help="A build directory (sliced/ and onnx/)."),
    provider: str = typer.Option("cpu", "--provider", help="cpu | cuda | tensorrt (ORT provider; torch uses CUDA "
                                                           "when it is not cpu)."),
    prompts: str = typer.Option("128,512,2048", "--prompts", help="Prefill prompt lengths, comma-separated "
                                                                  "(capped by the model's positions)."),
    batches: str = typer.Option("1,8", "--batches", help="Decode batch sizes, comma-separated."),
    steps: int = typer.Option(20, "--steps", help="Timed decode steps per batch size (after --warmup)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed decode steps first."),
    repeats: int = typer.Option(3, "--repeats", help="Timed prefills per prompt length (median reported)."),
    context: int = typer.Option(128, "--context", help="Cached tokens before the first decode step."),
    max_prompt: Optional[int] = typer.Option(None, "--max-prompt", help="Cap on prompt lengths."),
    dense: bool = typer.Option(True, "--dense/--no-dense", help="Also measure the dense source model."),
    torch_only: bool = typer.Option(False, "--torch-only", help="Torch eager only (builds without onnx/)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch and ORT intra-op threads (default: theirs)."),
    quantized: Optional[bool] = typer.Option(None, "--quantized/--no-quantized", help="Also measure the build's "
                                             "int4/int8 graph (default: when the build has quantized/)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report dir (default <build>/reports/latency)."),
) -> None:
    """Latency of a build's sliced model next to its dense source: TTFT, decode p50/p90/p99, tokens/s, memory."""
    from runtime.latency import bench_build

    out = out or build_dir / "reports" / "latency"
    with stage_progress("bench") as progress:
        result = bench_build(build_dir, out, provider=provider, prompts=prompts, batches=batches, steps=steps,
                             warmup=warmup, repeats=repeats, context=context, max_prompt=max_prompt, dense=dense,
                             torch_only=torch_only, threads=threads, quantized=quantized, progress=progress)
    table_out = Console(width=160) if not Console().is_terminal else Console()
    table_out.print(result.markdown_path.read_text(), highlight=False, markup=False)
    table_out.print(f"report: {', '.join(str(p) for p in result.paths.values())}", highlight=False)


@app.command("deploy")
@user_errors
def deploy_command(
    source: Path = typer.Argument(..., help="A build dir (uses onnx/, or trt/ for --backend tensorrt) or an ONNX "
                                            "export dir (e.g. a quantized one)."),
    out: Path = typer.Option(..., "--out", "-o", help="--genai: the model dir to write; --triton: the model "
                                                      "repository (other models in it are kept)."),
    genai: bool = typer.Option(False, "--genai", help="Write an onnxruntime-genai model dir (genai_config.json)."),
    triton: bool = typer.Option(False, "--triton", help="Write a Triton Inference Server model repository."),
    backend: str = typer.Option("onnxruntime", "--backend", help="Triton backend: onnxruntime | tensorrt (needs a "
                                                                 "TensorRT bundle with engine/model.plan)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int4 | int8: weight-only quantize the fp32 "
                                                                     "export first (onnxruntime's quantizers)."),
    block_size: int = typer.Option(32, "--block-size", help="int4: weights per quantization block."),
    quant_algorithm: str = QUANT_ALGORITHM_OPTION,
    quant_compute: str = QUANT_COMPUTE_OPTION,
    name: Optional[str] = typer.Option(None, "--name", help="Triton model name (default: llm)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Triton max_batch_size (dynamic batching up to it)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="genai: tokenizer dir or hub id when the "
                                                                      "export has no tokenizer files."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out (genai) or model (triton)."),
) -> None:
    """Package a model for the runtime users already run: onnxruntime-genai or Triton (optionally int4/int8)."""
    import tempfile

    if genai == triton:
        raise InvalidOptionError("pass exactly one of --genai or --triton")
    if backend not in ("onnxruntime", "tensorrt"):
        raise InvalidOptionError(f"unknown --backend {backend!r}; choose onnxruntime or tensorrt")
    if genai and backend != "onnxruntime":
        raise InvalidOptionError("--backend applies to --triton; onnxruntime-genai runs the ONNX graph")
    if quantize is not None and backend == "tensorrt":
        raise InvalidOptionError("--quantize produces an ONNX graph for onnxruntime; the TensorRT backend serves the "
                                 "bundle's engine (drop --quantize or use --backend onnxruntime)")
    source = source.expanduser()
    if backend == "tensorrt" and (source / "trt").is_dir():
        source = source / "trt"
    elif (source / "onnx" / "export_config.json").is_file():
        source = source / "onnx"
    printer = Console()
    with contextlib.ExitStack() as stack:
        if quantize is not None:
            from exporters.quantize import QuantizeOptions, accuracy_level, quantize_onnx

            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".deploy-", dir=_existing_parent(out))))
            result = quantize_onnx(source, scratch / "quantized", options=QuantizeOptions(
                mode=quantize, block_size=block_size, algorithm=quant_algorithm,
                accuracy_level=accuracy_level(quant_compute)))
            sizes, parity = result.report["sizes"], result.report["parity"]
            printer.print(f"quantized {quantize}: {sizes['quantized_bytes'] / 2**20:.1f} MB ({sizes['ratio']:.2f} x fp32), "
                          f"top-1 agreement with fp32 {parity['top1']:.3f}", highlight=False)
            source = result.out_dir
        if genai:
            from exporters.genai import export_genai

            done = export_genai(source, out, overwrite=force, tokenizer=tokenizer)
            padded = f"; KV padded to head size {done.head_size} in layers {done.padded_layers}" if done.padded_layers else ""
            printer.print(f"wrote {done.config_path} (model.type {done.model_type}, {done.model_file}{padded}); load it "
                          f"with onnxruntime_genai.Model({str(out)!r})", highlight=False)
        else:
            from exporters.triton import write_triton_repository

            repo = write_triton_repository(source, out, name=name or "llm", backend=backend,
                                           max_batch_size=max_batch, overwrite=force)
            check = f"validated with {repo.validated_with}" if repo.validated_with else \
                "not validated (pip install tritonclient[grpc])"
            printer.print(f"wrote {repo.model_dir} ({backend}, {len(repo.inputs)} inputs, {len(repo.outputs)} outputs, "
                          f"max_batch_size {repo.max_batch_size}; {check})", highlight=False)


@app.command("doctor")
@user_errors
def doctor_command(
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when a dependency is missing or outside its "
                                                        "tested range (for CI)."),
) -> None:
    """Installed versions of every dependency next to the range the toolchain was tested with."""
    from rich.table import Table

    from toolchain import __version__
    from toolchain.core.versions import dependency_checks

    checks = dependency_checks()
    table = Table("package", "installed", "tested range", "needed for", "status",
                  title=f"toolchain {__version__} (python {sys.version.split()[0]})")
    style = {"ok": "green", "missing": "dim", "outside": "bold red"}
    for check in checks:
        status = "not installed" if check.status == "missing" else check.status
        if check.problem:
            status = f"[{style[check.status]}]{'MISSING' if check.status == 'missing' else 'OUTSIDE tested range'}[/]"
        table.add_row(check.name, check.installed or "-", check.tested or "any", check.extra or "core", status)
    Console(width=max(Console().width, 100)).print(table)
    problems = [check for check in checks if check.problem]
    for check in problems:
        console.print(f"[bold yellow]warning:[/] {check.name} {check.installed or '(not installed)'} is outside the "
                      f"tested range {check.tested}; install the locked versions with scripts/setup.sh "
                      f"(or pip install '{check.name}{check.tested}')", highlight=False, soft_wrap=True)
    if strict and problems:
        raise typer.Exit(1)


def _existing_parent(path: Path) -> str:
    parent = path.expanduser().absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return str(parent)


def _add_tensorrt_commands() -> None:
    from exporters.tensorrt import cli as trt_cli

    app.add_typer(trt_cli, name="trt", help="TensorRT bundle: build the engine, check, validate")


_add_tensorrt_commands()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
