"""OrtSession's reading of a graph's KV layout, including graphs made by onnxruntime-genai's builder,
which leave the KV head size symbolic and state it in genai_config.json."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from runtime.sessions import _kv_layout
from toolchain.core.errors import ArtifactError


def _inputs(head_dim) -> dict:
    arg = lambda shape: SimpleNamespace(shape=shape, type="tensor(float)")  # noqa: E731
    inputs = {"input_ids": arg(["batch_size", "sequence_length"])}
    for layer in range(2):
        for kind in ("key", "value"):
            inputs[f"past_key_values.{layer}.{kind}"] = arg(["batch_size", 3, "past_sequence_length", head_dim])
    return inputs


def test_concrete_head_dims_are_read_from_the_graph(tmp_path):
    shapes, dtype = _kv_layout(_inputs(64), tmp_path / "model.onnx")
    assert [(s.heads, s.key_dim, s.value_dim) for s in shapes] == [(3, 64, 64)] * 2 and dtype == np.float32


def test_a_symbolic_head_dim_is_taken_from_genai_config(tmp_path):
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"head_size": 48}}}))
    shapes, _ = _kv_layout(_inputs("kv_cache_dim"), tmp_path / "model.onnx")
    assert [(s.heads, s.key_dim, s.value_dim) for s in shapes] == [(3, 48, 48)] * 2


def test_a_symbolic_head_dim_without_genai_config_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="head size symbolic"):
        _kv_layout(_inputs("kv_cache_dim"), tmp_path / "model.onnx")
