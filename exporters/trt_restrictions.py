"""The "Restrictions" column of onnx-tensorrt's docs/operators.md (TensorRT 10.15), for the ops an
exporter of decoder LLMs can emit, as far as a graph shows them without its weights: inputs that must
be build-time constants, input types, inputs/outputs/attributes the parser does not implement, ranks.
A graph that breaks one of these fails in the parser on the target GPU, after the copy and the wait.

`node_restrictions` returns one message per broken rule; exporters/trt_ops.py reports them.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

_ABSENT = object()  # the attribute must not be set at all
_REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSum", "ReduceSumSquare")

# Inputs that must be initializers / Constant outputs ("must be an initializer", "must be a build-time
# constant", "must be resolvable to a constant"): (index, name in the op's schema).
CONST_INPUTS: dict[str, tuple[tuple[int, str], ...]] = {
    **{op: ((1, "axes"),) for op in _REDUCE},
    "CumSum": ((1, "axis"),),
    "Squeeze": ((1, "axes"),), "Unsqueeze": ((1, "axes"),),
    "OneHot": ((1, "depth"),),
    "Dropout": ((2, "training_mode"),),
    "STFT": ((1, "frame_step"), (2, "window")),
}
# Inputs whose element type is narrower than the op's "Supported Types".
INPUT_TYPES: dict[str, dict[int, tuple[str, frozenset]]] = {
    "RotaryEmbedding": {3: ("position_ids", frozenset({onnx.TensorProto.INT64}))},
}
UNSUPPORTED_INPUTS = {"Attention": {4: "past_key", 5: "past_value", 6: "nonpad_kv_seqlen"}}
UNSUPPORTED_OUTPUTS = {"Attention": {1: "present_key", 2: "present_value", 3: "qk_matmul_output"},
                       "LayerNormalization": {1: "Mean", 2: "InvStdDev"}}
# attribute -> the only value the parser accepts (its ONNX default), or _ABSENT.
ATTRIBUTES: dict[str, dict[str, object]] = {
    "Attention": {"qk_matmul_output_mode": 0, "softcap": 0.0},
    "TopK": {"sorted": 1},
    "ScatterND": {"reduction": "none"},
    "TensorScatter": {"axis": -2},
    "Constant": {"sparse_value": _ABSENT, "value_string": _ABSENT, "value_strings": _ABSENT},
}
RANKS = {"Attention": {0: ("Q", 4), 1: ("K", 4), 2: ("V", 4), 3: ("attn_mask", 4)},
         "TensorScatter": {0: ("past_cache", 4), 1: ("update", 4)}}
TOPK_LIMIT = 3840  # "`K` input must be less than 3840"


def node_restrictions(node, types: dict[str, int], ranks: dict[str, int], constants: set[str],
                      values: dict[str, object]) -> list[str]:
    """Messages for every restriction `node` breaks. types/ranks: per tensor name where inference knows
    them; constants: initializer and Constant output names; values: small constant values (numpy)."""
    op, where = node.op_type, f"{node.op_type} node {node.name!r}" if node.name else f"a {node.op_type} node"
    messages = []
    for index, name in CONST_INPUTS.get(op, ()):
        tensor = _input(node, index)
        if tensor and tensor not in constants:
            messages.append(f"{where}: input {name} ({tensor!r}) must be a constant initializer for TensorRT")
    for index, (name, allowed) in INPUT_TYPES.get(op, {}).items():
        tensor = _input(node, index)
        if tensor and tensor in types and types[tensor] not in allowed:
            got = onnx.helper.tensor_dtype_to_string(types[tensor]).removeprefix("TensorProto.")
            want = "/".join(onnx.helper.tensor_dtype_to_string(t).removeprefix("TensorProto.") for t in sorted(allowed))
            messages.append(f"{where}: input {name} ({tensor!r}) is {got}; TensorRT needs {want}")
    for index, name in UNSUPPORTED_INPUTS.get(op, {}).items():
        if _input(node, index):
            messages.append(f"{where}: input {name} is not supported by TensorRT's parser")
    for index, name in UNSUPPORTED_OUTPUTS.get(op, {}).items():
        if index < len(node.output) and node.output[index]:
            messages.append(f"{where}: output {name} is not supported by TensorRT's parser (only the first output)")
    messages += _attribute_restrictions(node, where)
    for index, (name, rank) in RANKS.get(op, {}).items():
        tensor = _input(node, index)
        if tensor in ranks and ranks[tensor] != rank:
            messages.append(f"{where}: input {name} ({tensor!r}) has rank {ranks[tensor]}; TensorRT needs {rank}D")
    messages += _value_restrictions(node, where, values)
    return messages


def constant_values(model: onnx.ModelProto) -> dict[str, object]:
    """Values of initializers stored inside the model (not external data) and of Constant nodes."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
              if t.data_location != onnx.TensorProto.EXTERNAL}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every graph input/output and inferred intermediate that has a shape."""
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if value.type.tensor_type.HasField("shape"):
            ranks[value.name] = len(value.type.tensor_type.shape.dim)
    return ranks


def _input(node, index: int) -> str:
    return node.input[index] if index < len(node.input) else ""


def _attribute_restrictions(node, where: str) -> list[str]:
    rules = ATTRIBUTES.get(node.op_type, {})
    messages = []
    for attr in node.attribute:
        if attr.name not in rules:
            continue
        required, value = rules[attr.name], onnx.helper.get_attribute_value(attr)
        value = value.decode() if isinstance(value, bytes) else value
        if required is _ABSENT:
            messages.append(f"{where}: attribute {attr.name} is not supported by TensorRT's parser")
        elif value != required:
            messages.append(f"{where}: attribute {attr.name}={value!r} is not supported by TensorRT's parser "
                            f"(only {required!r})")
    return messages


def _value_restrictions(node, where: str, values: dict[str, object]) -> list[str]:
    """Rules on a constant input's value, checked when the value is in the graph."""
    if node.op_type == "TopK" and _input(node, 1) in values and int(values[_input(node, 1)].max()) >= TOPK_LIMIT:
        return [f"{where}: K = {int(values[_input(node, 1)].max())} must be less than {TOPK_LIMIT} for TensorRT"]
    if node.op_type == "Dropout" and _input(node, 2) in values and bool(values[_input(node, 2)].any()):
        return [f"{where}: training_mode must be False for TensorRT"]
    return []
