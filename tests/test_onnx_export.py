"""ONNX export of sliced models: I/O contract, fusion, fp16 islands, determinism, atomic output, CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from export_cases import build_dir, export_root, exported, sliced_model
from exporters.onnx import ExportOptions, export_onnx
from runtime.parity import check_parity
from runtime.sessions import OrtSession, TorchSession
from tiny_models import ARCHS, VOCAB, tiny_config
from toolchain.app.cli import app
from toolchain.core.errors import OutputPathError


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return export_root(tmp_path_factory)


def graph(out: Path) -> onnx.ModelProto:
    return onnx.load(str(out / "model.onnx"), load_external_data=False)


def dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_norms_equal_model_norms(arch, root):
    config = sliced_model(arch).config
    norms = config.num_hidden_layers * (1 if config.parallel_block else 2) + 1
    for dtype in ("fp32", "fp16"):
        out = exported(arch, dtype, root)
        counts = Counter(node.op_type for node in graph(out).graph.node)
        fused = counts["SimplifiedLayerNormalization"] + counts["SkipSimplifiedLayerNormalization"]
        assert fused == norms, (dtype, counts)
        assert counts["ReduceMean"] == 0 and counts["Pow"] == 0  # no unfused RMSNorm left behind
        report = json.loads((out / "export_report.json").read_text())
        assert report["fused_norms"] == report["model_norms"] == norms
        if report["graph"]["kind"] == "fast":  # emitted fused: attention is GroupQueryAttention, one per layer
            assert report["graph"]["parity"]["passed"] and report["graph"]["parity"]["dtype"] == dtype
            assert counts["GroupQueryAttention"] == config.num_hidden_layers and counts["Softmax"] == 0
        else:  # traced then fused by ORT's optimizer: the raw graph had one RMSNorm pattern per norm
            assert report["op_counts"]["exported"]["ReduceMean"] == norms
            assert arch == "mistral", report["graph"]  # fast covers every other export, fp32 and fp16


@pytest.mark.parametrize("arch", ARCHS)
def test_io_names_dims_and_configs(arch, root):
    config = sliced_model(arch).config
    layers = config.num_hidden_layers
    for dtype, kv_type in (("fp32", onnx.TensorProto.FLOAT), ("fp16", onnx.TensorProto.FLOAT16)):
        out = exported(arch, dtype, root)
        model = graph(out)
        inputs = {i.name: i for i in model.graph.input}
        outputs = {o.name: o for o in model.graph.output}
        kv_in = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
        assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *kv_in]
        assert list(outputs) == ["logits", *(f"present.{i}.{k}" for i in range(layers) for k in ("key", "value"))]
        assert dims(inputs["input_ids"]) == ["batch_size", "sequence_length"]
        assert dims(inputs["attention_mask"]) == ["batch_size", "total_sequence_length"]
        assert dims(outputs["logits"]) == ["batch_size", "sequence_length", VOCAB]
        assert outputs["logits"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        for i in range(layers):
            for kind, head_dim in (("key", config.qk_head_dims[i]), ("value", config.v_head_dims[i])):
                past, present = inputs[f"past_key_values.{i}.{kind}"], outputs[f"present.{i}.{kind}"]
                heads = config.num_key_value_heads
                assert dims(past) == ["batch_size", heads, "past_sequence_length", head_dim]
                assert dims(present) == ["batch_size", heads, "total_sequence_length", head_dim]
                assert past.type.tensor_type.elem_type == present.type.tensor_type.elem_type == kv_type
        assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] >= 20
        export_config = json.loads((out / "export_config.json").read_text())
        assert export_config["dtype"] == dtype and export_config["num_layers"] == layers
        assert export_config["residual_widths"] == config.residual_widths
        assert export_config["key_head_dims"] == config.qk_head_dims
        assert export_config["value_head_dims"] == config.v_head_dims
        assert [i["name"] for i in export_config["inputs"]] == list(inputs)
        canonical = json.loads((out / "sliced_config.json").read_text())  # what our own tools read
        assert canonical["model_type"] == "sliced_decoder" and canonical["residual_widths"] == config.residual_widths
        hf = json.loads((out / "config.json").read_text())  # what optimum reads: the source arch, the graph's KV
        assert hf["model_type"] == tiny_config(arch).model_type and hf["num_hidden_layers"] == layers
        assert hf["num_key_value_heads"] == config.num_key_value_heads
        assert hf["hidden_size"] // hf["num_attention_heads"] == dims(inputs["past_key_values.0.key"])[-1]


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_fp16_keeps_norms_rope_and_softmax_in_fp32(arch, root):
    """On the standard-op graph (no fusion) every op of the fp32 island reads fp32."""
    model = onnx.load(str(exported(arch, "fp16", root, optimize=False) / "model.onnx"))
    types = value_types(model)
    # (Pow is left out: GELU's x³ is a Pow outside the island; ReduceMean reading fp32 covers the norm's)
    island = [n for n in model.graph.node if n.op_type in ("Softmax", "ReduceMean", "Sqrt", "Cos", "Sin")]
    assert len(island) >= 4
    for node in island:
        assert types[node.input[0]] == onnx.TensorProto.FLOAT, (node.op_type, node.name)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert sum(types[n.input[1]] == onnx.TensorProto.FLOAT16 for n in matmuls) >= len(matmuls) // 2  # weights fp16


def test_export_is_byte_identical(root, tmp_path):
    again = export_onnx(sliced_model("llama"), tmp_path / "again", ExportOptions(dtype="fp32"))
    first = exported("llama", "fp32", root)
    assert (first / "model.onnx").read_bytes() == again.model_path.read_bytes()
    assert (first / "export_config.json").read_bytes() == (again.out_dir / "export_config.json").read_bytes()


@pytest.mark.parametrize("graph_kind", ["fast", "basic"])
def test_failed_export_leaves_no_output(root, tmp_path, monkeypatch, graph_kind):
    from exporters import onnx_graph, ort_fusion

    def broken(*args, **kwargs):
        raise RuntimeError("fusion exploded")

    monkeypatch.setattr(onnx_graph, "ort_fuse", broken)
    monkeypatch.setattr(ort_fusion, "build_fast_graph", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="fusion exploded"):
        export_onnx(sliced_model("llama"), out, ExportOptions(optimize=graph_kind), traced=root / "llama" / "traced.onnx")
    assert list(tmp_path.iterdir()) == []  # neither the dir nor its temp sibling


def test_export_refuses_existing_output(root, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputPathError, match="already exists"):
        export_onnx(sliced_model("llama"), tmp_path / "taken", traced=root / "llama" / "traced.onnx")


def test_cli_export_build_dir_without_optimisation(root, tmp_path):
    """`toolchain export <build dir>` reads its sliced/ model; --no-optimize keeps standard ops only."""
    out = tmp_path / "onnx"
    result = CliRunner().invoke(app, ["export", str(build_dir("opt", root)), "--target", "onnx",
                                      "--no-optimize", "--external-data", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx.data").is_file()
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    counts = Counter(n.op_type for n in graph(out).graph.node)
    assert counts["SimplifiedLayerNormalization"] == 0 and counts["ReduceMean"] == 5
    report = check_parity(TorchSession(sliced_model("opt")), OrtSession(out), "fp32", vocab_size=VOCAB)
    assert report["passed"], report["checks"]


@pytest.mark.parametrize("make_args, message", [
    (lambda d: ["export", str(d / "missing"), "--out", str(d / "o")], "does not exist"),
    (lambda d: ["export", str(d / "empty"), "--out", str(d / "o")], "config.json"),
    (lambda d: ["export", str(d / "empty"), "--out", str(d / "o"), "--dtype", "int3"], "--dtype"),
    (lambda d: ["export", str(d / "empty"), "--out", str(d / "o"), "--target", "tflite"], "--target"),
    (lambda d: ["export", str(d / "empty"), "--out", str(d / "o"), "--optimize", "turbo"], "turbo"),
])
def test_cli_export_bad_input(tmp_path, make_args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a model")
    result = CliRunner().invoke(app, make_args(tmp_path))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


def test_export_from_hf_checkpoint_dir(tmp_path):
    """Any dir AutoModelForCausalLM loads (here a plain HF Phi-3) is mapped to the canonical model.
    (Traced with the fast TorchScript fallback: this test is about loading, the dynamo path is covered above.)"""
    from tiny_models import tiny_hf_model

    hf = tiny_hf_model("phi3")
    hf.save_pretrained(tmp_path / "hf")
    result = export_onnx(tmp_path / "hf", tmp_path / "onnx", ExportOptions(optimize=False, exporter="torchscript"))
    assert result.config["source_model"] == str(tmp_path / "hf")
    import torch

    ids = np.array([[5, 6, 7, 8]])
    session = OrtSession(result.out_dir)
    logits, _ = session.run(ids, np.ones_like(ids), np.arange(4)[None], session.empty_past(1))
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - expected).max() < 1e-4


def test_torchscript_fallback_exports_the_same_function(tmp_path):
    """The legacy exporter (--exporter torchscript) is a working fallback: rms_norm gets a symbolic in
    the pattern ORT fuses, and the graph keeps the same I/O contract and numbers."""
    result = export_onnx(sliced_model("mistral"), tmp_path / "ts", ExportOptions(exporter="torchscript"))
    assert result.report["fused_norms"] == result.report["model_norms"] == 5
    assert [i["shape"] for i in result.config["inputs"][:2]] == [["batch_size", "sequence_length"],
                                                                 ["batch_size", "total_sequence_length"]]
    report = check_parity(TorchSession(sliced_model("mistral")), OrtSession(result.out_dir), "fp32", vocab_size=VOCAB)
    assert report["passed"], report["checks"]
