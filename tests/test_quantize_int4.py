"""int4 through our own writer (exporters/nbits.py): MatMulNBits and GatherBlockQuantized against ORT's
reference math and ORT's own quantizer, the token table shared with a tied head, GPTQ codes (a
round-to-nearest stand-in here) written into the graph, the report's bytes by part, bad options."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from export_cases import build_dir, export_root, exported, sliced_model
from exporters.nbits import gather_block_quantized, replace_matmuls
from exporters.quantize import QuantizeOptions, quantize_onnx
from tiny_models import tiny_tokenizer
from toolchain.app.cli import app
from toolchain.core.blockquant import rtn_quantize

CASES = [(4, 32, 80, 24), (4, 16, 48, 10), (4, 64, 64, 7), (4, 128, 200, 12), (8, 32, 80, 24), (8, 64, 100, 9)]


def _graph(k: int, n: int, weight_nk: np.ndarray) -> onnx.ModelProto:
    """x [?, K] · W [N, K]ᵀ and a Gather of W's rows by ids."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("Gather", ["t", "ids"], ["e"], name="emb")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n]),
         helper.make_tensor_value_info("e", TensorProto.FLOAT, [None, k])],
        [numpy_helper.from_array(np.ascontiguousarray(weight_nk.T), "w"), numpy_helper.from_array(weight_nk, "t")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, feeds: dict) -> list:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("bits,block,k,n", CASES)
def test_writer_equals_reference_math(bits, block, k, n):
    rng = np.random.default_rng(k + n)
    weight = rng.standard_normal((n, k)).astype(np.float32)
    q = rtn_quantize(weight, block, bits)
    model = _graph(k, n, weight)
    assert replace_matmuls(model, {"w": q}, accuracy_level=0) == 1
    if bits == 4:  # the lookup reads the MatMulNBits table (padded rows are cut back to K)
        gather_block_quantized(model, model.graph.node[1], q, "w", ensure_initializers=False)
    x, ids = rng.standard_normal((5, k)).astype(np.float32), np.array([0, 3, n - 1, 2, 3], np.int64)
    y, e = _run(model, {"x": x, "ids": ids})
    dequantized = q.dequantize()
    np.testing.assert_allclose(y, x @ dequantized.T, rtol=1e-5, atol=1e-4)
    if bits == 4:
        np.testing.assert_array_equal(e, dequantized[ids])
        assert "t" not in {t.name for t in model.graph.initializer}  # one table: the MatMulNBits one


@pytest.mark.parametrize("bits,block,k,n", CASES)
def test_rtn_through_writer_equals_ort_quantizer(bits, block, k, n):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(7 * k + n)
    weight = (rng.standard_normal((n, k)) * rng.uniform(0.01, 3, (n, 1))).astype(np.float32)
    weight[0] = np.abs(weight[0])  # a row with no negative weight: the range is widened to 0
    weight[1] = 0.0
    ours = _graph(k, n, weight)
    replace_matmuls(ours, {"w": rtn_quantize(weight, block, bits)}, accuracy_level=4)
    theirs = _graph(k, n, weight)
    quantizer = MatMulNBitsQuantizer(theirs, bits=bits, block_size=block, is_symmetric=False, accuracy_level=4)
    quantizer.process()
    theirs = quantizer.model.model
    ours_inits = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    theirs_inits = {t.name: numpy_helper.to_array(t) for t in theirs.graph.initializer}
    assert ours_inits.keys() == theirs_inits.keys()
    for name, array in theirs_inits.items():
        np.testing.assert_array_equal(ours_inits[name], array, err_msg=name)
    (a,), (b,) = ([n for n in m.graph.node if n.op_type == "MatMulNBits"] for m in (ours, theirs))
    assert (list(a.input), a.name, sorted((x.name, x.i) for x in a.attribute)) == \
        (list(b.input), b.name, sorted((x.name, x.i) for x in b.attribute))


# --- on an exported (tiny, tied, sliced) model ---------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return export_root(tmp_path_factory)


@pytest.fixture(scope="module")
def export(root):
    """The llama export (tied table, fast graph) with tokenizer files, so parity can score text."""
    source = exported("llama", "fp32", root)
    tokenizer = root / "int4-tokenizer"
    if not tokenizer.exists():
        tiny_tokenizer().save_pretrained(tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, source / name)
    return source


def _inits(path):
    return {t.name: t for t in onnx.load(str(path / "model.onnx")).graph.initializer}


def test_shared_table_stored_once_and_report_adds_up(export, tmp_path):
    out = tmp_path / "int4-shared"
    result = quantize_onnx(export, out, options=QuantizeOptions(embeddings=True, residual_bits=4))
    graph = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert "Gather" not in [n.op_type for n in graph.graph.node if "input_ids" in n.input] and "GatherBlockQuantized" in ops
    inits = {t.name for t in graph.graph.initializer}
    assert "embed_tokens.weight" not in inits and "lm_head.weight" not in inits  # no fp32 copy of either
    packed = [name for name in inits if name.endswith("_Q4") and "lm_head" in name]
    assert packed == ["lm_head.weight_Q4"]  # the head's table is the only int4 table
    record = result.report["quantization"]
    assert record["embeddings"] == {"quantized": True, "bits": 4, "shared_with_head": True}
    assert record["matmul_bits"] == {"4": sum(1 for n in graph.graph.node if n.op_type == "MatMulNBits")}

    sizes = result.report["sizes"]
    parts = sizes["parts"]
    assert set(parts) == {"token_table", "head", "block_linears", "shortcuts_projections", "other"}
    assert parts["token_table"]["quantized_bytes"] < 64  # only the Reshape's shape: the rows are the head's
    assert parts["head"]["quantized_bytes"] < parts["head"]["fp32_bytes"] / 3  # (K pads up to whole blocks)
    for key, file_bytes in (("fp32_bytes", sizes["fp32_bytes"]), ("quantized_bytes", sizes["quantized_bytes"])):
        total = sum(part[key] for part in parts.values())
        assert 0 < file_bytes - total < 0.05 * file_bytes + 20_000, (key, total, file_bytes)  # protobuf framing, graph
    # (a tiny graph: the new nodes and names are a visible share of the file)
    assert sizes["expected_bytes"] == pytest.approx(sizes["quantized_bytes"], rel=0.1)
    # the quantized graph still runs and agrees with fp32 on random ids
    assert result.report["parity"]["cosine"] > 0.9


def test_table_alone_when_the_head_stays_8_bit(export, tmp_path):
    result = quantize_onnx(export, tmp_path / "int4-table", options=QuantizeOptions(embeddings=True), parity=False)
    inits = _inits(tmp_path / "int4-table")
    assert {"embed_tokens.weight_Q4", "lm_head.weight_Q8"} <= set(inits) and "embed_tokens.weight" not in inits
    assert result.report["quantization"]["embeddings"]["shared_with_head"] is False
    assert result.report["sizes"]["parts"]["token_table"]["quantized_bytes"] > 0


def test_minmax_writer_equals_ort_quantizer_graph(export, tmp_path, monkeypatch):
    """Round to nearest through our writer == today's int4 graph (onnxruntime's MatMulNBitsQuantizer)."""
    ours = quantize_onnx(export, tmp_path / "ours", parity=False)
    assert "writer" in ours.report["quantization"]["tool"]
    import dataclasses

    import exporters.quantize as quantize

    original = quantize._quantize
    monkeypatch.setattr(quantize, "_algorithm_config", lambda options, bits: None)  # ORT's own min/max rounding

    def ort_path(model, src, tmp, options, calibration=None, progress=None):
        # a name the writer does not take sends the MatMuls through onnxruntime's quantizer, as before
        return original(model, src, tmp, dataclasses.replace(options, algorithm="ort"), calibration, progress)

    monkeypatch.setattr(quantize, "_quantize", ort_path)
    theirs = quantize_onnx(export, tmp_path / "theirs", parity=False)
    assert "MatMulNBitsQuantizer" in theirs.report["quantization"]["tool"]
    a, b = _inits(tmp_path / "ours"), _inits(tmp_path / "theirs")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(numpy_helper.to_array(a[name]), numpy_helper.to_array(b[name]), err_msg=name)


def _rtn_stand_in(model, input_ids, attention_mask, block_size=32, bits=4, modules=None, progress=None, **_):
    """GPTQ's contract with round to nearest inside: {canonical module name: BlockQuantized of W [out, in]}."""
    import torch

    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert input_ids.shape == attention_mask.shape and input_ids.shape[0] >= 1
    return {name: rtn_quantize(linears[name].weight.detach().numpy(), block_size, bits) for name in modules or linears}


def _gptq_build(root, tmp_path):
    build = build_dir("llama", root)
    model = tmp_path / "build"
    model.mkdir()
    shutil.copytree(build / "sliced", model / "sliced")
    (model / "onnx").symlink_to((build / "onnx").resolve(), target_is_directory=True)
    tiny_tokenizer().save_pretrained(model / "sliced")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the market rose as investors bought shares of the company"] * 400))
    return model, text


def test_gptq_codes_written_packed(root, tmp_path, monkeypatch):
    """A stand-in returning round-to-nearest codes per canonical module gives the minmax graph exactly:
    q/k/v and gate/up are concatenated along N into the packed MatMuls, the rest map one to one."""
    import toolchain.compress.gptq as gptq
    from exporters.gptq_weights import Calibration

    monkeypatch.setattr(gptq, "gptq_quantize", _rtn_stand_in)
    build, text = _gptq_build(root, tmp_path)
    calibration = Calibration(build / "sliced", str(text), nsamples=2, seqlen=16)
    options = dict(embeddings=True, residual_bits=4)
    calibrated = quantize_onnx(build / "onnx", tmp_path / "gptq", parity=False, calibration=calibration,
                               options=QuantizeOptions(algorithm="gptq", **options))
    minmax = quantize_onnx(build / "onnx", tmp_path / "minmax", parity=False, options=QuantizeOptions(**options))
    assert calibrated.report["quantization"]["calibration"] == {"calib": str(text), "nsamples": 2, "seqlen": 16}
    a, b = _inits(tmp_path / "gptq"), _inits(tmp_path / "minmax")
    assert a.keys() == b.keys() and any(name.endswith("qkv_proj.weight_Q4") for name in a)
    for name in a:
        np.testing.assert_array_equal(numpy_helper.to_array(a[name]), numpy_helper.to_array(b[name]), err_msg=name)


def test_gptq_refuses_a_bare_export(root, tmp_path):
    with pytest.raises(Exception, match="canonical model"):
        quantize_onnx(exported("llama", "fp32", root), tmp_path / "q", parity=False,
                      options=QuantizeOptions(algorithm="gptq"))


@pytest.mark.parametrize("args,message", [
    (["--quantize", "int4", "--residual-bits", "5"], "--residual-bits"),
    (["--quantize", "int8", "--quantize-embeddings"], "--quantize-embeddings"),
    (["--quantize", "int4", "--quant-algorithm", "gptq"], "build dir"),
    (["--quantize", "int4", "--quant-algorithm", "optq"], "unknown --quant-algorithm"),
])
def test_bad_options_exit_2_with_one_error_line(args, message, root, tmp_path):
    source = exported("llama", "fp32", root)  # a bare export dir: no canonical model beside it
    result = CliRunner().invoke(app, ["deploy", str(source), "--genai", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith("error:")]) == 1 and message in result.output, result.output
    assert not (tmp_path / "out").exists()
