"""Canonical model (dense or sliced) → one ONNX graph with KV cache that serves prefill and decode.

Graphs (`ExportOptions.optimize`):
  fast   (default) the model emitted directly as ORT's fused contrib ops — GroupQueryAttention,
         RotaryEmbedding, (Skip)SimplifiedLayerNormalization, packed MatMuls (exporters/ort_fusion.py),
         in fp32 or fp16 — then checked against torch (batch 2, left padding, prefill + decode) at that
         dtype's parity bar before it is kept. Models it cannot express exactly (q/k ≠ v or
         non-multiple-of-8 head dims as MoDeGPT leaves them with --modegpt-multiple 1, sliding windows),
         and graphs ORT cannot load or that miss the bar, fall back to `basic`, with the reason in
         export_report.json and the log.
  basic  torch.onnx.export(dynamo=True) → check → ORT transformer optimizer (fuses the norms only)
         → [fp16 with fp32 islands] → check. Standard ops plus ORT's norm ops.
  none   the traced graph with standard ONNX ops only (what TensorRT and other runtimes parse).
Beside the graph: export_config.json (I/O contract and per-layer dims), export_report.json (op counts
before/after, checks, timings), sliced_config.json (the canonical config), config.json (the source
architecture's config with the graph's KV dims: exporters/hf_config.py) and generation_config.json +
tokenizer files when the source has them, so onnxruntime-genai and optimum find what they expect.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from runtime.loading import load_causal_lm, to_canonical_model
from toolchain import __version__
from toolchain.core.errors import InvalidOptionError, first_line
from toolchain.core.fileio import atomic_dir, sha256_file, write_json
from toolchain.core.iospec import DIM_DESCRIPTIONS, PAST_PREFIX, dynamic_axes, input_names, kv_head_dims, output_names
from toolchain.core.tokenizer_files import copy_tokenizer_files
from toolchain.model.finite import require_finite_model
from toolchain.model.modeling import SlicedForCausalLM

from exporters import onnx_graph, ort_fusion
from exporters.hf_config import CANONICAL_CONFIG, CONFIG as HF_CONFIG, source_config
from exporters.kv_wrapper import KVCacheWrapper, dynamic_shapes, example_inputs

DTYPES = ("fp32", "fp16")
GRAPHS = ("fast", "basic", "none")
log = logging.getLogger(__name__)
EXPORTERS = ("dynamo", "torchscript")
MODEL_FILE = "model.onnx"
# Stay clear of protobuf's hard 2 GB limit (graph + metadata ride along with the weights).
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)
# The fast graph's in-process parity check holds the torch model and an ORT session at once.
VERIFY_MAX_BYTES = 4 * 2**30


@dataclass
class ExportOptions:
    dtype: str = "fp32"  # fp32 | fp16 (logits fp32; norms and softmax accumulate in fp32)
    # fast | basic | none (module doc); True = fast, False = none. fast and basic use ORT contrib ops.
    optimize: bool | str = True
    verify: bool = True  # fast: compare with torch before keeping the graph (fall back to basic if off the dtype's bar)
    external_data: bool = False  # always write weights to model.onnx.data (automatic past ~1.8 GB)
    opset: int = 20
    exporter: str = "dynamo"  # "torchscript": the legacy exporter, a fallback if dynamo fails
    overwrite: bool = False


@dataclass
class ExportResult:
    out_dir: Path
    model_path: Path
    config: dict  # export_config.json
    report: dict  # export_report.json


def export_onnx(source: str | Path | nn.Module, out: str | Path, options: ExportOptions | None = None,
                traced: str | Path | None = None) -> ExportResult:
    """Export `source` (a canonical/HF model object, a model dir or a hub id) into the new dir `out`.

    `traced`: a graph `trace_onnx` already wrote for this same model; reusing it skips the torch
    export (the slow step), e.g. to produce fp32 and fp16 variants from one trace. The fast graph is
    built from the weights and never needs it.
    """
    options = options or ExportOptions()
    _check_options(options)
    model, source_dir, source_name = _load(source)
    require_finite_model(model, "model to export:")  # a NaN weight would export, run and "pass" a same-NaN parity check
    config = model.config
    weight_bytes = sum(p.numel() for p in model.parameters()) * (2 if options.dtype == "fp16" else 4)
    external = options.external_data or weight_bytes >= EXTERNAL_DATA_THRESHOLD
    timings, checks = {}, {}

    graph_kind, fallback = choose_graph(config, options)
    with atomic_dir(out, overwrite=options.overwrite) as tmp:
        stages = tmp / ".stages"
        stages.mkdir()
        counts, verification = {}, None
        if graph_kind == "fast":
            current = stages / "fast.onnx"
            start = time.perf_counter()
            onnx_graph.save(ort_fusion.build_fast_graph(model, options.opset, options.dtype), current, external)
            timings["fast_graph_s"] = time.perf_counter() - start
            fallback, verification = _keep_fast(model, current, options, weight_bytes, checks, timings)
            graph_kind = "fast" if fallback is None else "basic"
            if graph_kind == "fast":
                counts["fast"] = onnx_graph.op_counts(onnx_graph.load_graph(current))
        if fallback is not None:
            log.warning("onnx export: fast ORT graph not used (%s); writing the basic graph", fallback)
        if graph_kind != "fast":
            current = stages / "exported.onnx"
            start = time.perf_counter()
            if traced is None:
                trace_onnx(model, current, options, external)
                timings["torch_export_s"] = time.perf_counter() - start
            else:
                onnx_graph.save(onnx.load(str(traced)), current, external)
            checks["exported"] = onnx_graph.check(current)
            graph = onnx_graph.load_graph(current)  # reload: the check wrote inferred shapes into it
            counts["exported"] = onnx_graph.op_counts(graph)

        if graph_kind == "basic":
            start = time.perf_counter()
            graph = onnx_graph.ort_fuse(current, stages / "fused.onnx", external)
            timings["ort_fusion_s"] = time.perf_counter() - start
            current = stages / "fused.onnx"
            counts["fused"] = onnx_graph.op_counts(graph)
        if options.dtype == "fp16" and graph_kind != "fast":  # the fast graph is emitted in fp16 directly
            start = time.perf_counter()
            graph = onnx_graph.to_fp16(current, stages / "fp16.onnx", external)
            timings["fp16_s"] = time.perf_counter() - start
            current = stages / "fp16.onnx"
            counts["fp16"] = onnx_graph.op_counts(graph)

        final = tmp / MODEL_FILE
        onnx_graph.save(onnx.load(str(current)), final, external)
        shutil.rmtree(stages)
        checks["final"] = onnx_graph.check(final)
        graph = onnx_graph.load_graph(final)

        export_config = _export_config(model, graph, options, external, source_name, graph_kind)
        report = _report(config, options, counts, onnx_graph.op_counts(graph), checks, timings, tmp)
        report["graph"] = {"kind": graph_kind, "requested": graph_option(options), "fallback_reason": fallback,
                           "parity": verification}
        write_json(tmp / "export_config.json", export_config)
        write_json(tmp / "export_report.json", report)
        config.to_json_file(tmp / CANONICAL_CONFIG)  # the canonical config, what our own tools read
        write_json(tmp / HF_CONFIG, source_config(config, options.dtype))  # what optimum / transformers 4.x read
        copy_tokenizer_files(source_dir, tmp)
    out = Path(out)
    return ExportResult(out, out / MODEL_FILE, export_config, report)


def _keep_fast(model: SlicedForCausalLM, path: Path, options: ExportOptions, weight_bytes: int, checks: dict,
               timings: dict) -> tuple[str | None, dict | None]:
    """(why the fast graph at `path` is not kept, or None; its parity against torch)."""
    try:
        checks["fast"] = onnx_graph.check(path)
    except Exception as err:  # noqa: BLE001  (e.g. a provider without a kernel for an op at this dtype)
        return f"onnxruntime cannot load the {options.dtype} fast graph ({first_line(err)[:300]})", None
    if not options.verify:
        return None, None
    if weight_bytes > VERIFY_MAX_BYTES:
        return None, {"passed": None, "skipped": f"weights of {weight_bytes / 2**30:.1f} GB: torch and ORT copies "
                      "side by side would not fit comfortably; run `toolchain validate`"}
    start = time.perf_counter()
    verification = verify_graph(model, path, options.dtype)
    timings["verify_s"] = time.perf_counter() - start
    if not verification["passed"]:
        return f"the fast graph missed the {options.dtype} parity bar ({verification['summary']})", verification
    return None, verification


def graph_option(options: ExportOptions) -> str:
    """ExportOptions.optimize as one of GRAPHS (True = fast, False = none)."""
    if isinstance(options.optimize, bool):
        return "fast" if options.optimize else "none"
    return str(options.optimize).lower()


def choose_graph(config, options: ExportOptions) -> tuple[str, str | None]:
    """(graph kind to write, why the requested fast graph is not used or None)."""
    kind = graph_option(options)
    if kind != "fast":
        return kind, None
    if (reason := ort_fusion.unsupported_reason(config)) is not None:
        return "basic", reason
    return "fast", None


def verify_graph(model: SlicedForCausalLM, path: Path, dtype: str = "fp32") -> dict:
    """The fast graph against the fp32 torch model at `dtype`'s parity bar: batch 2 with a left-padded
    row, prefill + 3 decode steps (runtime/parity.py). Returns the summary and pass/fail."""
    from runtime.parity import check_parity
    from runtime.sessions import OrtSession, TorchSession

    try:
        report = check_parity(TorchSession(model), OrtSession(path), dtype, vocab_size=model.config.vocab_size)
    except Exception as err:  # noqa: BLE001  (an ORT kernel refusing a shape: fall back, never fail the export)
        return {"passed": False, "summary": f"onnxruntime failed to run it: {str(err).strip().splitlines()[-1][:300]}"}
    logits = report["summary"]["logits"]
    summary = {"logits_max_abs": logits["max_abs"], "top1": logits["top1"]}
    for check in report["checks"]:
        if "max abs" in check["check"]:
            summary["limit"] = check["limit"]
        elif "top-1" in check["check"]:
            summary.update(top1_with_ties=check["value"], top1_min=check["limit"])
        elif "cosine" in check["check"]:
            summary.update(cosine=check["value"], cosine_min=check["limit"])
    return {"passed": report["passed"], "dtype": dtype, "inputs": report["inputs"], "summary": summary}


def expected_norm_count(config) -> int:
    """Norms in the canonical model: 2 per sequential layer, 1 per parallel layer, plus the final one."""
    return config.num_hidden_layers * (1 if config.parallel_block else 2) + 1


def _check_options(options: ExportOptions) -> None:
    if options.dtype not in DTYPES:
        raise InvalidOptionError(f"--dtype {options.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if options.exporter not in EXPORTERS:
        raise InvalidOptionError(f"unknown --exporter {options.exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if graph_option(options) not in GRAPHS:
        raise InvalidOptionError(f"--optimize {options.optimize!r} is unknown; choose one of {', '.join(GRAPHS)}")
    if options.opset < 20:
        raise InvalidOptionError(f"opset {options.opset} is too old; use 20 or newer")


def _load(source) -> tuple[SlicedForCausalLM, Path | None, str]:
    if isinstance(source, nn.Module):
        name = getattr(source.config, "source_model", None) or getattr(source.config, "_name_or_path", "") or "in-memory"
        model = source if isinstance(source, SlicedForCausalLM) else to_canonical_model(source, name)
        if any(p.dtype != torch.float32 for p in model.parameters()):
            model = copy.deepcopy(model).float()  # export traces fp32; fp16 is a graph pass
        return model.eval(), None, str(name)
    model, path = load_causal_lm(source)
    return to_canonical_model(model, str(source)), path, str(source)


def trace_onnx(model: SlicedForCausalLM, path: str | Path, options: ExportOptions | None = None,
               external: bool = False) -> Path:
    """torch → the raw fp32 ONNX graph (standard ops only) at `path`, dims renamed, not yet checked."""
    options = options or ExportOptions()
    path = Path(path)
    layers = model.config.num_hidden_layers
    wrapper = KVCacheWrapper(model).eval()
    args = example_inputs(model.config)
    names = {"input_names": input_names(layers), "output_names": output_names(layers)}
    with torch.no_grad(), _quiet_torch_export():
        if options.exporter == "dynamo":
            try:
                program = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=dynamic_shapes(layers),
                                            opset_version=options.opset, verbose=False, optimize=True, **names)
            except Exception as err:
                err.add_note("toolchain: the dynamo exporter failed on this model; `--exporter torchscript` "
                             "(ExportOptions(exporter='torchscript')) is the fallback")
                raise
            graph = program.model_proto
        else:  # legacy TorchScript exporter; writes the file itself
            torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, options.opset)
            torch.onnx.export(wrapper, args, str(path), dynamo=False, dynamic_axes=dynamic_axes(layers),
                              opset_version=options.opset, do_constant_folding=True, **names)
            graph = onnx.load(str(path))
    onnx_graph.rename_dims(graph)
    onnx_graph.save(graph, path, external)
    return path


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """aten::rms_norm for the TorchScript exporter (it has none), in the Pow/ReduceMean/Add/Sqrt/Div/Mul
    form ORT's optimizer fuses into SimplifiedLayerNormalization."""
    from torch.onnx import symbolic_helper

    dims = len(symbolic_helper._parse_arg(normalized_shape, "is"))
    eps = symbolic_helper._parse_arg(eps, "f") if not symbolic_helper._is_none(eps) else torch.finfo(torch.float32).eps
    const = lambda value, dtype=torch.float32: g.op("Constant", value_t=torch.tensor(value, dtype=dtype))  # noqa: E731
    mean_square = g.op("ReduceMean", g.op("Pow", x, const(2.0)), const(list(range(-dims, 0)), torch.long), keepdims_i=1)
    normed = g.op("Div", x, g.op("Sqrt", g.op("Add", mean_square, const(eps))))
    return normed if symbolic_helper._is_none(weight) else g.op("Mul", normed, weight)


@contextlib.contextmanager
def _quiet_torch_export():
    """torch.onnx warns about optional torchvision ops and dim renames it handles itself; keep the
    CLI output to what the user can act on."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _io_spec(values) -> list[dict]:
    spec = []
    for value in values:
        tensor = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        spec.append({"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                     "shape": shape})
    return spec


def _export_config(model, graph: onnx.ModelProto, options: ExportOptions, external: bool, source: str,
                   graph_kind: str) -> dict:
    config = model.config
    opsets = {entry.domain or "ai.onnx": entry.version for entry in graph.opset_import}
    inputs, outputs = _io_spec(graph.graph.input), _io_spec(graph.graph.output)
    kv_dtype = next((i["dtype"] for i in inputs if i["name"].startswith(PAST_PREFIX)), None)
    return {
        "format": "onnx",
        "model_file": MODEL_FILE,
        "external_data": MODEL_FILE + onnx_graph.DATA_SUFFIX if external else None,
        "dtype": options.dtype,
        "kv_cache_dtype": kv_dtype,
        "logits_dtype": next(o["dtype"] for o in outputs if o["name"] == "logits"),
        "opset": opsets.get("ai.onnx"),
        "opsets": dict(sorted(opsets.items())),
        "optimized": graph_kind != "none",
        "graph": graph_kind,
        "exporter": options.exporter,
        "inputs": inputs,
        "outputs": outputs,
        "dims": dict(DIM_DESCRIPTIONS),
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "num_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "key_head_dims": [k for k, _ in kv_head_dims(config)],
        "value_head_dims": [v for _, v in kv_head_dims(config)],
        "residual_widths": list(config.residual_widths),
        "intermediate_sizes": list(config.intermediate_sizes),
        "parallel_block": config.parallel_block,
        "compression": config.compression,
        "source_model": config.source_model or source,
        "toolchain_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "onnx_version": onnx.__version__,
    }


def _report(config, options: ExportOptions, counts: dict, final_counts: dict, checks: dict, timings: dict,
            out_dir: Path) -> dict:
    fused = sum(final_counts.get(op, 0) for op in onnx_graph.ORT_FUSED_NORMS)
    files = {p.name: sha256_file(p) for p in sorted(out_dir.glob(MODEL_FILE + "*"))}
    return {
        "op_counts": {**counts, "final": final_counts},
        "fused_norms": fused,
        "model_norms": expected_norm_count(config),
        "checks": checks,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "sha256": files,
        "options": {k: v for k, v in asdict(options).items() if k != "overwrite"},
    }
