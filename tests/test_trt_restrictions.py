"""The static TensorRT check enforces the parser restrictions (onnx-tensorrt docs/operators.md) for ops
an LLM exporter can emit: each small graph below breaks one rule and must be reported, and its compliant
twin must not be."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.trt_ops import check_graph

F16, I64 = TensorProto.FLOAT16, TensorProto.INT64


def graph(nodes, inputs, outputs, initializers=(), opset=23):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(initializers)),
                              opset_imports=[helper.make_opsetid("", opset)])
    return model


def value(name, dtype=F16, shape=(1, 2, 4, 8)):
    return helper.make_tensor_value_info(name, dtype, shape)


def restrictions(model) -> list[str]:
    return [p.message for p in check_graph(model).problems if p.kind == "restriction"]


def rotary(position_type):
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], name="rope", num_heads=2)
    return graph([node], [value("x"), value("cos", F16, (16, 4)), value("sin", F16, (16, 4)),
                          value("pos", position_type, (1, 4))], [value("y")])


def test_rotary_embedding_position_ids_must_be_int64():
    assert restrictions(rotary(TensorProto.INT32)) == [
        "RotaryEmbedding node 'rope': input position_ids ('pos') is INT32; TensorRT needs INT64"]
    assert restrictions(rotary(I64)) == []


@pytest.mark.parametrize("op", ["Squeeze", "Unsqueeze"])
def test_squeeze_and_unsqueeze_axes_must_be_constant(op):
    shape = (1, 2, 1, 8)
    computed = graph([helper.make_node(op, ["x", "axes"], ["y"], name="sq")],
                     [value("x", F16, shape), value("axes", I64, (1,))], [value("y", F16, None)])
    message = f"{op} node 'sq': input axes ('axes') must be a constant initializer for TensorRT"
    assert restrictions(computed) == [message]
    initializer = graph([helper.make_node(op, ["x", "axes"], ["y"], name="sq")], [value("x", F16, shape)],
                        [value("y", F16, None)], [numpy_helper.from_array(np.array([2], np.int64), "axes")])
    assert restrictions(initializer) == []
    constant = graph([helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([2]))),
                      helper.make_node(op, ["x", "axes"], ["y"], name="sq")], [value("x", F16, shape)],
                     [value("y", F16, None)])
    assert restrictions(constant) == []


def attention(inputs=("q", "k", "v"), outputs=("y",), q_shape=(1, 2, 4, 8), **attrs):
    node = helper.make_node("Attention", list(inputs), list(outputs), name="attn", **attrs)
    feeds = [value("q", F16, q_shape), value("k"), value("v"), value("past_key")]
    return graph([node], [f for f in feeds if f.name in inputs], [value(o, F16, None) for o in outputs])


def test_attention_without_kv_cache_io_softcap_or_3d_inputs():
    assert restrictions(attention()) == []
    assert restrictions(attention(inputs=("q", "k", "v", "", "past_key"))) == [
        "Attention node 'attn': input past_key is not supported by TensorRT's parser"]
    assert restrictions(attention(outputs=("y", "present_key"))) == [
        "Attention node 'attn': output present_key is not supported by TensorRT's parser (only the first output)"]
    assert restrictions(attention(softcap=30.0)) == [
        "Attention node 'attn': attribute softcap=30.0 is not supported by TensorRT's parser (only 0.0)"]
    assert restrictions(attention(softcap=0.0)) == []  # the default, spelled out, is fine
    assert restrictions(attention(q_shape=(1, 4, 16))) == [
        "Attention node 'attn': input Q ('q') has rank 3; TensorRT needs 4D"]


def test_layer_norm_only_first_output_and_topk_sorted_below_limit():
    norm = graph([helper.make_node("LayerNormalization", ["x", "w"], ["y", "mean"], name="ln")],
                 [value("x"), value("w", F16, (8,))], [value("y"), value("mean", TensorProto.FLOAT, None)])
    assert restrictions(norm) == [
        "LayerNormalization node 'ln': output Mean is not supported by TensorRT's parser (only the first output)"]

    def topk(k, **attrs):
        return graph([helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="top", **attrs)],
                     [value("x", F16, (1, 5000))], [value("values", F16, None), value("indices", I64, None)],
                     [numpy_helper.from_array(np.array([k], np.int64), "k")])
    assert restrictions(topk(50)) == []
    assert restrictions(topk(50, sorted=0)) == [
        "TopK node 'top': attribute sorted=0 is not supported by TensorRT's parser (only 1)"]
    assert restrictions(topk(4000)) == ["TopK node 'top': K = 4000 must be less than 3840 for TensorRT"]


def test_dropout_training_mode_and_string_constants():
    def dropout(training):
        return graph([helper.make_node("Dropout", ["x", "ratio", "training"], ["y"], name="drop")],
                     [value("x")], [value("y")],
                     [numpy_helper.from_array(np.array(0.1, np.float16), "ratio"),
                      numpy_helper.from_array(np.array(training), "training")])
    assert restrictions(dropout(False)) == []
    assert restrictions(dropout(True)) == ["Dropout node 'drop': training_mode must be False for TensorRT"]

    strings = graph([helper.make_node("Constant", [], ["s"], name="text", value_string="hello")], [],
                    [helper.make_tensor_value_info("s", TensorProto.STRING, ())])
    assert "Constant node 'text': attribute value_string is not supported by TensorRT's parser" in \
        restrictions(strings)
