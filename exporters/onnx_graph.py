"""Passes over an exported ONNX graph: dim names, ORT fusion, fp16 with fp32 islands, saving, checks.

Every pass works on a file path so models past protobuf's 2 GB limit (external data) go through
the same code.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import onnx

from toolchain.core.iospec import PAST, SEQ, TOTAL

# Ops ORT's transformer optimizer emits that onnx's checker has no schema for.
ORT_FUSED_NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
# Modules whose nodes stay fp32 in an fp16 graph: norms (mean of squares overflows fp16) and RoPE
# angles (position × frequency needs more than fp16's 11 bits once positions pass 2048).
FP32_MODULES = ("ResidualNorm", "RotaryEmbedding")
FP32_OPS = (*ORT_FUSED_NORMS, "LayerNormalization", "RMSNormalization", "Softmax")
DATA_SUFFIX = ".data"
TWO_GB = 2**31


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = Counter(node.op_type for node in model.graph.node)
    return dict(sorted(counts.items()))


def load_graph(path: Path) -> onnx.ModelProto:
    """The graph without its weights (external tensors stay on disk)."""
    return onnx.load(str(path), load_external_data=False)


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in model.graph.initializer:
        location = {entry.key: entry.value for entry in tensor.external_data}
        total += int(location.get("length", 0)) if location else len(tensor.raw_data)
    return total


def rename_dims(model: onnx.ModelProto) -> None:
    """torch.export names the presents' length `past_sequence_length + sequence_length`; the
    genai/optimum name for it is `total_sequence_length`."""
    derived = {f"{PAST} + {SEQ}": TOTAL, f"{SEQ} + {PAST}": TOTAL}
    for info in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param in derived:
                dim.dim_param = derived[dim.dim_param]


def save(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Write `path` (and `path.name + .data` when external); a stale data file is removed first
    because onnx appends to it."""
    data = path.with_name(path.name + DATA_SUFFIX)
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def has_ort_ops(model: onnx.ModelProto) -> bool:
    return any(node.domain not in ("", "ai.onnx") or node.op_type in ORT_FUSED_NORMS for node in model.graph.node)


def check(path: Path) -> str:
    """Full onnx check + shape inference (written back into the file) for standard-op graphs; graphs
    with ORT contrib ops (which onnx has no schemas for) are checked by building an ORT session."""
    graph = load_graph(path)
    if has_ort_ops(graph):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return "onnxruntime session (graph has ORT contrib ops onnx cannot check)"
    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True)
    return "onnx.checker full_check + strict shape inference"


def ort_fuse(src: Path, dst: Path, external: bool) -> onnx.ModelProto:
    """ORT transformer optimizer, fusion passes only (opt_level 0 keeps the graph provider-neutral;
    ORT applies its own level-2 optimisations when a session loads it). 'gpt2' fuses RMSNorm into
    (Skip)SimplifiedLayerNormalization; num_heads/hidden_size 0 = detect."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    quiet = _quiet_ort_transformers()
    try:
        optimized = optimize_model(str(src), model_type="gpt2", num_heads=0, hidden_size=0, opt_level=0,
                                   optimization_options=FusionOptions("gpt2"), use_gpu=False)
    finally:
        quiet()
    rename_dims(optimized.model)
    _declare_domains(optimized.model)
    save(optimized.model, dst, external)
    return load_graph(dst)


def _declare_domains(model: onnx.ModelProto) -> None:
    """The optimizer adds com.microsoft nodes without importing the domain; onnx's shape inference
    (run by the fp16 converter) rejects that."""
    declared = {entry.domain for entry in model.opset_import}
    for domain in sorted({node.domain for node in model.graph.node} - declared - {"", "ai.onnx"}):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))


def fp32_island(model: onnx.ModelProto) -> list[str]:
    """Nodes an fp16 graph keeps in fp32: norms, RoPE angles, and softmax with the mask add before it
    (fp16's -65504 mask plus a negative score overflows to -inf; an all-masked row then gives NaN)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    keep: list[str] = []
    for node in model.graph.node:
        namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        if node.op_type in FP32_OPS or any(f".{module}/" in namespace for module in FP32_MODULES):
            keep.append(node.name)
        if node.op_type == "Softmax":
            parent = producers.get(node.input[0])
            if parent is not None and parent.op_type == "Add":
                keep.append(parent.name)
    return sorted(set(keep))


def to_fp16(src: Path, dst: Path, external: bool) -> onnx.ModelProto:
    """fp16 weights, activations and KV cache; logits output and the fp32 island stay fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    graph = onnx.load(str(src))  # with weights: the converter rewrites initializers
    if not has_ort_ops(graph):
        # Standard ops: drop the exporter's fp32 value_info, which the converter would leave
        # contradicting the new types; shape inference recovers all of it. (Fused graphs keep theirs:
        # onnx cannot infer through ORT's contrib ops, and the converter needs the types.)
        del graph.graph.value_info[:]
    island = fp32_island(graph)
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = convert_float_to_float16(graph, keep_io_types=["logits"], node_block_list=island,
                                         disable_shape_infer=initializer_bytes(graph) >= TWO_GB)
    OnnxModel(converted).topological_sort()  # the converter appends its Cast nodes at the end
    save(converted, dst, external)
    return load_graph(dst)


def _quiet_ort_transformers():
    """The optimizer logs a warning per unmatched pattern; keep the CLI output readable."""
    loggers = [logging.getLogger(name) for name in ("onnxruntime.transformers", "fusion_base", "onnx_model",
                                                    "fusion_utils", "fusion_skiplayernorm",
                                                    "fusion_simplified_layernorm", "symbolic_shape_infer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)

    def restore():
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

    return restore
