"""`bench_build`: a build's sliced model measured next to its dense source on every available
backend, with the ideal (bytes and FLOPs) ratios beside the measured speedup.

Output files (one atomic dir): latency.json, latency.md, prefill_latency.png, decode_throughput.png,
ideal_vs_measured.png (toolchain.analysis.bench_report).
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from toolchain.core.build_dirs import model_dir
from toolchain.core.errors import ArtifactError, ToolchainError

from runtime.latency import (DEFAULT_BATCHES, DEFAULT_PROMPTS, BenchConfig, Measured, ModelCost, Progress,
                             graph_weight_bytes, load_average, load_drift, measure_sessions, model_cost, parse_ints,
                             torch_threads)
from runtime.loading import load_build_source, load_causal_lm
from runtime.sessions import OrtSession, Session, TorchSession, provider_name

from toolchain.analysis.bench_report import JSON_FILE, MARKDOWN_FILE, finish_report, new_report, write_report

log = logging.getLogger(__name__)


@dataclass
class Backend:
    """One thing to measure: `open()` builds the session when its group's turn comes (the variants of
    one backend are resident together when interleaving), `close()` frees what it holds."""

    name: str
    variant: str
    dtype: str
    open: Callable[[], Session]
    cost: Callable[[], ModelCost]
    close: Callable[[], None] = field(default=lambda: None)
    optional: bool = False  # e.g. TensorRT: a machine that cannot run it records why and goes on


@dataclass
class BenchResult:
    data: dict
    paths: dict[str, Path]

    @property
    def json_path(self) -> Path:
        return self.paths[JSON_FILE]

    @property
    def markdown_path(self) -> Path:
        return self.paths[MARKDOWN_FILE]


def bench_build(build_dir: str | Path, out_dir: str | Path, provider: str = "cpu",
                prompts: Iterable[int] | str | None = None, batches: Iterable[int] | str | None = None,
                steps: int = 20, warmup: int = 3, repeats: int = 3, context: int = 128,
                max_prompt: int | None = None, dense: bool = True, torch_only: bool = False,
                threads: int | None = None, quantized: bool | None = None,
                progress: Progress | None = None, interleave: bool = True) -> BenchResult:
    """Measure the build's sliced model (torch eager on sliced/, ORT on onnx/, the int4/int8 graph in
    quantized/ on ORT, TensorRT when available) and, unless `dense=False`, its dense source on the same
    backends (the dense ONNX is exported to a temp dir with the build's export settings). `quantized`:
    None measures quantized/ when the build has one. Writes the report into `out_dir`.

    `interleave` (default): the variants of one backend are loaded together and take turns call by
    call (BenchConfig.interleave), so a ratio is not skewed by load that came and went between them;
    False measures one model at a time (less memory). The report records the load average at the
    start, between backends and at the end, and warns when it moved a lot (runtime.latency.load_drift)."""
    build = Path(build_dir).expanduser()
    provider = provider.lower()
    provider_name(provider)  # unknown or not-installed providers fail before anything loads
    config = BenchConfig(prompts=parse_ints(prompts, "prompts") or DEFAULT_PROMPTS,
                         batches=parse_ints(batches, "batches") or DEFAULT_BATCHES, steps=steps, warmup=warmup,
                         repeats=repeats, context=context, max_prompt=max_prompt, threads=threads,
                         interleave=interleave)
    config.validate()
    layout = _check_build(build, torch_only)
    sliced_config = json.loads((model_dir(build) / "config.json").read_text())
    max_positions = sliced_config.get("max_position_embeddings")
    data = new_report(str(build), provider, layout["dtype"], config)
    backends = _build_backends(build, layout, provider, dense, torch_only, threads, data["skipped"],
                               _quantized_dir(build, quantized) if not torch_only else None)

    per_backend = len(config.prompt_lengths(max_positions)) + len(config.batches)
    total, done = per_backend * len(backends), 0

    def tick() -> None:
        nonlocal done
        done += 1
        progress and progress(done, total)

    progress and progress(0, total)
    costs: dict[str, ModelCost] = {}
    loads = data["machine"].setdefault("load_samples", [data["machine"]["load_average"]])
    with torch_threads(threads):
        for group in _groups(backends, config.interleave):
            entries, opened, start = [], [], done
            try:
                for backend in group:
                    try:
                        session = backend.open()
                    except ToolchainError as err:
                        if not backend.optional:
                            raise
                        data["skipped"].append({"backend": backend.name, "variant": backend.variant,
                                                "reason": str(err)})
                        done += per_backend
                        progress and progress(done, total)
                        continue
                    opened.append(backend)
                    if backend.variant not in costs:
                        costs[backend.variant] = backend.cost()
                    entries.append(Measured(backend.variant, session, backend.dtype,
                                            costs[backend.variant].as_result_model(backend.dtype)))
                if entries:
                    start = done
                    data["results"] += measure_sessions(entries, config, max_positions, tick)
            except ToolchainError as err:
                if not opened or not all(b.optional for b in opened):
                    raise
                data["skipped"] += [{"backend": b.name, "variant": b.variant, "reason": str(err)} for b in opened]
                done = start + per_backend * len(opened)
                progress and progress(done, total)
            finally:
                entries = session = None
                for backend in opened:
                    backend.close()
                gc.collect()
            loads.append(load_average())
    finish_report(data, costs)
    data["machine"]["load_warning"] = load_drift([*loads, data["machine"]["load_average_end"]],
                                                 data["machine"].get("cpu_count"))
    if data["machine"]["load_warning"]:
        log.warning("bench: %s", data["machine"]["load_warning"])
    return BenchResult(data, write_report(data, out_dir, title=f"Latency: {build.name}"))


def _groups(backends: list[Backend], interleave: bool) -> list[list[Backend]]:
    """Backends measured together: every variant on one backend name (sliced, its int4 graph, dense),
    in first-seen order; one each when not interleaving."""
    if not interleave:
        return [[b] for b in backends]
    groups: dict[str, list[Backend]] = {}
    for backend in backends:
        groups.setdefault(backend.name, []).append(backend)
    return list(groups.values())


def _check_build(build: Path, torch_only: bool) -> dict:
    if not (model_dir(build) / "config.json").is_file():
        raise ArtifactError(f"{build} is not a build dir (no sliced/config.json); pass a directory made by "
                            "`toolchain build`")
    onnx_dir = build / "onnx"
    if torch_only:
        return {"onnx": None, "dtype": "fp32", "optimize": True, "exporter": "dynamo"}
    if not (onnx_dir / "model.onnx").is_file():
        raise ArtifactError(f"{build} has no onnx/ export; run `toolchain build --target onnx` on it first, or "
                            "bench the torch model only with --torch-only")
    export = {}
    if (onnx_dir / "export_config.json").is_file():
        export = json.loads((onnx_dir / "export_config.json").read_text())
    # the dense export mirrors the build's, so both graphs get the same precision, fusions and exporter
    # ("graph": fast | basic | none; older exports only record whether ORT fused them)
    return {"onnx": onnx_dir, "dtype": export.get("dtype", "fp32"),
            "optimize": export.get("graph", export.get("optimized", True)),
            "exporter": export.get("exporter", "dynamo")}


def _torch_device(provider: str) -> str:
    import torch

    return "cuda" if provider != "cpu" and torch.cuda.is_available() else "cpu"


def _quantized_dir(build: Path, wanted: bool | None) -> Path | None:
    path = build / "quantized"
    present = (path / "model.onnx").is_file() and (path / "export_config.json").is_file()
    if wanted and not present:
        raise ArtifactError(f"{build} has no quantized/ graph; build it with `toolchain build ... --quantize int4`")
    return path if present and wanted is not False else None


def _build_backends(build: Path, layout: dict, provider: str, dense: bool, torch_only: bool,
                    threads: int | None, skipped: list, quantized: Path | None = None) -> list[Backend]:
    """sliced torch, sliced ORT, [sliced int4/int8 ORT], [sliced TensorRT], then dense torch and dense
    ORT (exported to a temp dir), in that order; grouped by backend name, so at most one backend's
    models are resident at a time."""
    device = _torch_device(provider)
    holder: dict = {}

    def load_sliced():
        model, _ = load_causal_lm(model_dir(build))
        holder["sliced"] = model.to(device)
        return TorchSession(holder["sliced"], name=f"torch-{device}")

    def sliced_cost():
        # counted once: the int4/int8 and TensorRT variants reuse it instead of reloading sliced/
        if "sliced_cost" not in holder:
            if "sliced" in holder:
                holder["sliced_cost"] = model_cost(holder["sliced"])
            else:
                        holder["sliced_cost"] = model_cost(load_causal_lm(model_dir(build))[0])
        return holder["sliced_cost"]

    backends = [Backend(f"torch-{device}", "sliced", "fp32", load_sliced, sliced_cost,
                        lambda: holder.pop("sliced", None))]
    if not torch_only:
        backends.append(Backend(f"ort-{provider}", "sliced", layout["dtype"],
                                lambda: OrtSession(layout["onnx"], provider, threads=threads), sliced_cost))
        if quantized is not None:
            mode = json.loads((quantized / "export_config.json").read_text())["quantization"]["mode"]

            def quantized_cost():
                stored, read = graph_weight_bytes(quantized / "model.onnx")
                return replace(sliced_cost(), stored_bytes=stored, stored_read_bytes=read)

            backends.append(Backend(f"ort-{provider}", f"sliced-{mode}", mode,
                                    lambda: OrtSession(quantized, provider, threads=threads), quantized_cost))
        trt = _trt_backend(build, skipped)
        if trt is not None:
            trt.cost = sliced_cost
            backends.append(trt)
    if not dense:
        skipped.append({"backend": "all", "variant": "dense", "reason": "--no-dense"})
        return backends

    scratch: dict = {}

    def load_dense():
        holder["dense"] = load_build_source(build).to(device)
        return TorchSession(holder["dense"], name=f"torch-{device}")

    def dense_cost():
        if "dense" not in holder:
            holder["dense"] = load_build_source(build)
        return model_cost(holder["dense"])

    def open_dense_onnx():
        from exporters.onnx import ExportOptions, export_onnx

        model = holder.get("dense") or load_build_source(build)
        holder["dense_cost"] = model_cost(model)
        scratch["dir"] = tempfile.TemporaryDirectory(prefix="toolchain-dense-onnx-")
        out = Path(scratch["dir"].name) / "onnx"
        export_onnx(model.float().cpu(), out, ExportOptions(dtype=layout["dtype"], optimize=layout["optimize"],
                                                            exporter=layout["exporter"]))
        holder.pop("dense", None)
        del model
        gc.collect()
        return OrtSession(out, provider, threads=threads)

    def close_dense_onnx():
        if "dir" in scratch:
            scratch.pop("dir").cleanup()

    backends.append(Backend(f"torch-{device}", "dense", "fp32", load_dense, dense_cost))
    if not torch_only:
        backends.append(Backend(f"ort-{provider}", "dense", layout["dtype"], open_dense_onnx,
                                lambda: holder.get("dense_cost") or dense_cost(), close_dense_onnx))
    return backends


def _trt_backend(build: Path, skipped: list) -> Backend | None:
    """TensorRT on the build's trt/ bundle through runtime/trt_session.py, when TensorRT imports;
    a bundle without an engine for this GPU is recorded as skipped, not an error."""
    if not (build / "trt").is_dir():
        skipped.append({"backend": "tensorrt", "variant": "sliced",
                        "reason": "no trt/ bundle; build with `toolchain build --target trt`"})
        return None
    try:
        import tensorrt  # noqa: F401

        from runtime.trt_session import open_trt_session
    except ImportError as err:
        skipped.append({"backend": "tensorrt", "variant": "sliced", "reason": f"TensorRT is not importable ({err})"})
        return None
    return Backend("tensorrt", "sliced", "fp16", lambda: open_trt_session(build / "trt"), lambda: None,
                   optional=True)
