"""What TensorRT's ONNX parser accepts, and a static check of a graph (+ its build profiles) against it.

Source of the list: onnx/onnx-tensorrt `docs/operators.md` for the TensorRT 10.15 GA release
("TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"), the parser that
ships inside TensorRT 10.15. TensorRT 11.x only added parser ops on top of that list (its release
notes: Swish, TRT_Attention/TRT_MoE/TRT_KVCacheUpdate), so a graph that passes here also parses there.
Types per op are the doc's "Supported Types" column; an op missing from SUPPORTED is rejected.

The check runs anywhere (no TensorRT needed): ops and domains, opset range, tensor types per op,
the doc's per-op restrictions a graph shows statically (exporters/trt_restrictions.py: constant axes,
RotaryEmbedding's INT64 position_ids, unsupported inputs/outputs/attributes, ranks), and that every
graph input's dims are covered by each optimisation profile of `trt_build.json`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto

from toolchain.core.errors import ArtifactError
from toolchain.core.iospec import PAST, SEQ, TOTAL

from exporters.trt_restrictions import constant_values, node_restrictions, tensor_ranks

TARGET = "10.15"
SOURCE = "onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15 GA)"
OPSET_RANGE = (9, 24)


class IncompatibleGraphError(ArtifactError):
    """The bundle's graph would not parse or build with TensorRT."""


# Type groups of the doc's "Supported Types" column.
F = frozenset({"FP32", "FP16", "BF16"})
FI = F | {"INT32", "INT64"}
FIB = FI | {"BOOL"}
HALF = frozenset({"FP32", "FP16"})
BOOL = frozenset({"BOOL"})
QUANT = frozenset({"INT8", "FP8", "FP4", "INT4"})

_GROUPS: dict[frozenset, str] = {
    F: "Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos "
       "Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool "
       "GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf "
       "LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool "
       "MeanVarianceNormalization ParametricSoftplus PRelu QuantizeLinear RandomNormal RandomNormalLike "
       "RandomUniform RandomUniformLike Reciprocal Resize RMSNormalization RNN RotaryEmbedding Round ScaledTanh "
       "Scan Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample",
    FI: "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min Mod "
        "Mul Neg Pad Pow Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin "
        "ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth "
        "Sub Sum TopK",
    FIB: "Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot Reshape "
         "ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where",
    HALF: "BlackmanWindow DeformConv GridSample HammingWindow HannWindow Mish NonMaxSuppression NonZero RoiAlign",
    BOOL: "And Not Or Xor",
}
SUPPORTED: dict[str, frozenset] = {op: types for types, ops in _GROUPS.items() for op in ops.split()}
SUPPORTED.update({
    "Attention": F | {"INT8", "FP8"},
    "Cast": FIB | {"UINT8"}, "CastLike": FIB | {"UINT8"},
    "Constant": FIB | {"FP8", "FP4", "INT4"}, "ConstantOfShape": FIB | {"FP8", "FP4", "INT4"},
    "DequantizeLinear": QUANT,
    "Gelu": FI | {"INT8"},
    "Mean": FI | {"FP8"},
    "STFT": frozenset({"FP32"}),
    "TensorScatter": F | {"INT32"},
})
# Listed with "N" in the doc: named in the error so it is clear the op is known-unsupported.
UNSUPPORTED = frozenset(
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress "
    "ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool "
    "MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement "
    "QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase "
    "SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat "
    "StringNormalizer StringSplit TfIdfVectorizer Unique".split())

# ONNX element types → the doc's names; anything else (double, uint16/32/64, int16, string, complex) fails.
TYPE_NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
              TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
              TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL", TensorProto.FLOAT8E4M3FN: "FP8",
              TensorProto.INT4: "INT4", TensorProto.FLOAT4E2M1: "FP4"}
DEFAULT_DOMAINS = ("", "ai.onnx")
# Which tensors the "Supported Types" column is about (default: input 0, the data input).
_TYPED_OUTPUTS = {"Constant", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform"}
_TYPED_INPUTS = {"Where": (1, 2)}


@dataclass
class Problem:
    kind: str  # op | domain | opset | dtype | restriction | profile
    message: str
    op: str = ""
    node: str = ""


@dataclass
class CompatReport:
    target: str
    source: str
    op_counts: dict[str, int]
    problems: list[Problem] = field(default_factory=list)
    checked: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        nodes = sum(self.op_counts.values())
        if self.passed:
            return (f"TensorRT {self.target} compatible: {nodes} nodes, {len(self.op_counts)} op types, all in the "
                    f"parser's supported list; types and profiles OK")
        first = "; ".join(p.message for p in self.problems[:3])
        more = f" (+{len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        return f"not TensorRT {self.target} compatible: {first}{more}"

    def to_dict(self) -> dict:
        return {"target": f"TensorRT {self.target}", "source": self.source, "passed": self.passed,
                "problems": [asdict(p) for p in self.problems], "checked": self.checked,
                "op_counts": self.op_counts}


def check_graph(model: onnx.ModelProto | str | Path, profiles: list[dict] | None = None) -> CompatReport:
    """Static TensorRT-parser check of `model` (a path loads the graph without its weights)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)  # types for every tensor we can reach
    types, ranks, values = _tensor_types(inferred), tensor_ranks(inferred), constant_values(model)
    constants = {t.name for t in model.graph.initializer}
    functions = {(f.domain, f.name): f for f in model.functions}
    problems: list[Problem] = []
    counts: Counter = Counter()
    typed = untyped = 0

    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(Problem("opset", f"opset {opset} is outside TensorRT {TARGET}'s range "
                                         f"{OPSET_RANGE[0]}..{OPSET_RANGE[1]}"))
    for node in _walk(model.graph.node, functions):
        counts[node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"] += 1
        if node.op_type == "Constant":
            constants.update(node.output)
        problem = _check_op(node)
        if problem:
            problems.append(problem)
            continue
        for name in _typed_tensors(node):
            if name not in types:
                untyped += 1
                continue
            typed += 1
            problem = _check_type(node, name, types[name])
            if problem:
                problems.append(problem)
        problems += [Problem("restriction", message, node.op_type, node.name)
                     for message in node_restrictions(node, types, ranks, constants, values)]
    problems += _check_io_types(model, types)
    if profiles is not None:
        problems += check_profiles(model, profiles)
    checked = {"nodes": sum(counts.values()), "opset": opset, "typed_tensors": typed, "untyped_tensors": untyped,
               "profiles": len(profiles) if profiles is not None else 0}
    return CompatReport(TARGET, SOURCE, dict(sorted(counts.items())), problems, checked)


def check_profiles(model: onnx.ModelProto, profiles: list[dict]) -> list[Problem]:
    """Every graph input has min/opt/max in every profile, static dims match, dims sharing a name share
    a range, min ≤ opt ≤ max, and total_sequence_length covers past + sequence."""
    problems: list[Problem] = []
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    if not profiles:
        problems.append(Problem("profile", "no optimisation profiles: a graph with dynamic inputs needs at least one"))
    for profile in profiles:
        label, shapes = profile.get("name", "?"), profile.get("shapes", {})
        for extra in sorted(set(shapes) - set(inputs)):
            problems.append(Problem("profile", f"profile {label}: {extra} is not a graph input"))
        ranges: dict[str, set] = {}
        for name, dims in inputs.items():
            spec = shapes.get(name)
            if spec is None:
                problems.append(Problem("profile", f"profile {label}: no shapes for input {name}"))
                continue
            lo, opt, hi = spec["min"], spec["opt"], spec["max"]
            if not len(lo) == len(opt) == len(hi) == len(dims):
                problems.append(Problem("profile", f"profile {label}: {name} has rank {len(dims)}, shapes do not"))
                continue
            for axis, dim in enumerate(dims):
                triple = (lo[axis], opt[axis], hi[axis])
                if not 0 <= triple[0] <= triple[1] <= triple[2]:
                    problems.append(Problem("profile", f"profile {label}: {name} dim {axis} needs 0 ≤ min ≤ opt ≤ "
                                                       f"max, got {triple}"))
                if isinstance(dim, int) and dim > 0 and triple != (dim, dim, dim):
                    problems.append(Problem("profile", f"profile {label}: {name} dim {axis} is static {dim}, profile "
                                                       f"says {triple}"))
                elif isinstance(dim, str):
                    ranges.setdefault(dim, set()).add(triple)
                elif dim == 0:  # neither static nor named: the parser sees -1 and needs a range all the same
                    ranges.setdefault(f"{name}[{axis}]", set()).add(triple)
        for dim, seen in sorted(ranges.items()):
            if len(seen) > 1:
                problems.append(Problem("profile", f"profile {label}: dim {dim} has different ranges across inputs "
                                                   f"{sorted(seen)}"))
        if all(len(ranges.get(d, ())) == 1 for d in (SEQ, PAST, TOTAL)):
            (seq,), (past,), (total,) = ranges[SEQ], ranges[PAST], ranges[TOTAL]
            if total[0] > seq[0] + past[0] or total[2] < seq[2] + past[2]:
                problems.append(Problem("profile", f"profile {label}: {TOTAL} {total} does not cover {PAST} {past} + "
                                                   f"{SEQ} {seq}"))
    return problems


def _walk(nodes, functions: dict, seen: set | None = None):
    """Nodes of the graph, its subgraphs (If/Loop/Scan) and the model-local functions it calls (which the
    parser inlines); the call node itself is not yielded."""
    seen = set() if seen is None else seen
    for node in nodes:
        key = (node.domain, node.op_type)
        if key in functions:
            if key not in seen:
                seen.add(key)
                yield from _walk(functions[key].node, functions, seen)
            continue
        yield node
        for attr in node.attribute:
            for graph in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _walk(graph.node, functions, seen)


def _check_op(node) -> Problem | None:
    where = f"node {node.name!r}" if node.name else "a node"
    if node.domain not in DEFAULT_DOMAINS:
        return Problem("domain", f"{node.op_type} ({node.domain}) is not a standard ONNX op: TensorRT's parser has no "
                                 f"importer for domain {node.domain} ({where}); export with ORT fusions off",
                       node.op_type, node.name)
    if node.op_type not in SUPPORTED:
        state = "listed as unsupported" if node.op_type in UNSUPPORTED else "not in the supported list"
        return Problem("op", f"{node.op_type} is {state} for TensorRT {TARGET} ({where})", node.op_type, node.name)
    return None


def _typed_tensors(node) -> list[str]:
    if node.op_type in _TYPED_OUTPUTS:
        return list(node.output[:1])
    if node.op_type in ("Cast", "CastLike"):
        return [*node.input[:1], *node.output[:1]]
    indices = _TYPED_INPUTS.get(node.op_type, (0,))
    return [node.input[i] for i in indices if i < len(node.input) and node.input[i]]


def _check_type(node, tensor: str, elem_type: int) -> Problem | None:
    name = TYPE_NAMES.get(elem_type) or onnx.helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.")
    if name in SUPPORTED[node.op_type]:
        return None
    return Problem("dtype", f"{node.op_type} on {name} ({tensor!r}) is not supported by TensorRT {TARGET} (supports "
                            f"{', '.join(sorted(SUPPORTED[node.op_type]))})", node.op_type, node.name)


def _check_io_types(model: onnx.ModelProto, types: dict[str, int]) -> list[Problem]:
    """Graph inputs/outputs and weights: only TensorRT types; DOUBLE would be silently clamped to float."""
    problems = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            elem = value.type.tensor_type.elem_type
            if elem not in TYPE_NAMES or TYPE_NAMES[elem] in ("INT4", "FP4"):
                kind_name = onnx.helper.tensor_dtype_to_string(elem)
                problems.append(Problem("dtype", f"graph {kind} {value.name} has type {kind_name}, not a TensorRT "
                                                 "I/O type"))
    for tensor in model.graph.initializer:
        if tensor.data_type not in TYPE_NAMES:
            kind_name = onnx.helper.tensor_dtype_to_string(tensor.data_type)
            problems.append(Problem("dtype", f"weight {tensor.name} has type {kind_name}, not a TensorRT type"))
    return problems


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {t.name: t.data_type for t in model.graph.initializer}
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for node in model.graph.node:  # Constant outputs are not always in value_info
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types
