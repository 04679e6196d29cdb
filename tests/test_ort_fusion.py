"""The fast ORT graph (exporters/ort_fusion.py): fused op counts, fp32 parity with torch for dense and
sliced models of every arch it supports (batch 2 with left padding, prefill + decode), in-place KV
cache sessions, int4 on top, the fp16 fast graph at the fp16 bar, and the fallback to the traced graph
where it cannot be exact or misses the bar."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from export_cases import sliced_model
from exporters.onnx import ExportOptions, export_onnx
from exporters import ort_fusion
from exporters.onnx import choose_graph
from runtime.generate import greedy_generate
from runtime.parity import check_parity, make_inputs, run_steps
from runtime.sessions import OrtSession, TorchSession
from tiny_models import ARCHS, VOCAB, tiny_hf_model
from toolchain.model.adapters import to_canonical
from toolchain.core.errors import InvalidOptionError
from toolchain.model.modeling import SlicedConfig, SlicedForCausalLM

FAST_ARCHS = [a for a in ARCHS if a != "mistral"]  # mistral's sliding window falls back (tested below)


def dense_model(arch: str):
    return to_canonical(tiny_hf_model(arch)).eval()


def model_for(arch: str, kind: str):
    return sliced_model(arch) if kind == "sliced" else dense_model(arch)


@pytest.fixture(scope="module")
def fast_graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    cache = {}

    def get(arch: str, kind: str):
        if (arch, kind) not in cache:
            path = root / f"{arch}-{kind}.onnx"
            onnx.save(ort_fusion.build_fast_graph(model_for(arch, kind)), str(path))
            cache[arch, kind] = path
        return cache[arch, kind]

    return get


@pytest.mark.parametrize("kind", ["dense", "sliced"])
@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_fast_graph_ops_and_fp32_parity(arch, kind, fast_graphs):
    model = model_for(arch, kind)
    graph = onnx.load(str(fast_graphs(arch, kind)))
    counts = Counter(node.op_type for node in graph.graph.node)
    for op, expected in ort_fusion.expected_counts(model.config).items():
        assert counts[op] == expected, (op, counts)
    rope = model.config.position_embedding == "rope"
    assert counts["RotaryEmbedding"] == (2 * model.config.num_hidden_layers if rope else 0)
    assert counts["Softmax"] == counts["ReduceMean"] == counts["Transpose"] == 0  # nothing left unfused
    if kind == "sliced":  # widths really differ: shortcuts are MatMuls feeding the skip input of the norms
        assert len(set(model.config.residual_widths)) > 1
    # batch 2, row 1 left-padded by 3, prefill 12 tokens + 3 decode steps, presents compared too
    report = check_parity(TorchSession(model), OrtSession(fast_graphs(arch, kind)), "fp32", vocab_size=VOCAB)
    assert report["passed"], report["checks"]
    assert report["inputs"]["left_padding"] == [0, 3]
    assert report["summary"]["present"]["max_abs"] < 1e-4


@pytest.mark.parametrize("kind", ["dense", "sliced"])
@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_fast_graph_fp16_parity(arch, kind, tmp_path):
    """The fp16 fast graph: the same fused ops, fp16 weights and KV cache, fp32 logits, the first norm
    stashing in fp32, and the fp16 bar against the fp32 torch model (batch 2, left padding, prefill +
    decode) on ORT's CPU kernels."""
    model = model_for(arch, kind)
    graph = ort_fusion.build_fast_graph(model, dtype="fp16")
    counts = Counter(node.op_type for node in graph.graph.node)
    for op, expected in ort_fusion.expected_counts(model.config).items():
        assert counts[op] == expected, (op, counts)
    assert counts["Softmax"] == counts["ReduceMean"] == 0
    floats = [t for t in graph.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT16 for t in floats)
    kinds = {v.name: v.type.tensor_type.elem_type for v in (*graph.graph.input, *graph.graph.output)}
    assert kinds["logits"] == onnx.TensorProto.FLOAT
    assert {t for n, t in kinds.items() if "key" in n or "value" in n} == {onnx.TensorProto.FLOAT16}
    first_norm = next(n for n in graph.graph.node if n.op_type == "SimplifiedLayerNormalization")
    assert {a.name: a.i for a in first_norm.attribute}["stash_type"] == 1
    path = tmp_path / "fp16.onnx"
    onnx.save(graph, str(path))
    session = OrtSession(path)
    assert session.kv_dtype == np.float16
    report = check_parity(TorchSession(model), session, "fp16", vocab_size=VOCAB)
    assert report["passed"], report["checks"]
    logits = report["summary"]["logits"]
    # measured ≤ 1.1e-2 (logits of scale ~5, fp16 rounding); far below what a wrong op would give
    assert logits["max_abs"] < 3e-2 and logits["cosine"] > 0.9999 and report["summary"]["present"]["max_abs"] < 2e-2
    assert logits["top1"] >= 0.95  # at most one near-tie flip among the 21 compared rows


@pytest.mark.parametrize("arch", ["llama", "phi3", "opt"])
def test_in_place_kv_cache_matches_torch(arch, fast_graphs):
    """kv_buffer: past and present share one buffer per layer (GroupQueryAttention appends in place);
    logits, presents and greedy tokens stay those of torch, with left padding and batch 2."""
    model = sliced_model(arch)
    session = OrtSession(fast_graphs(arch, "sliced"), kv_buffer=24)
    report = check_parity(TorchSession(model), session, "fp32", vocab_size=VOCAB)
    assert report["passed"], report["checks"]
    inputs = make_inputs(VOCAB, batch=2, prompt=6, pad=2, decode_steps=0)
    expected = greedy_generate(TorchSession(model), inputs.input_ids, inputs.attention_mask, max_new_tokens=12)
    got = greedy_generate(session, inputs.input_ids, inputs.attention_mask, max_new_tokens=12)
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(InvalidOptionError, match="KV buffer"):
        greedy_generate(session, inputs.input_ids, inputs.attention_mask, max_new_tokens=24)


def test_fp16_in_place_kv_cache_matches_its_own_fp16_run(tmp_path):
    """kv_buffer with fp16 buffers continues in place exactly as the copying session does."""
    path = tmp_path / "fp16.onnx"
    onnx.save(ort_fusion.build_fast_graph(sliced_model("llama"), dtype="fp16"), str(path))
    inputs = make_inputs(VOCAB, batch=2, prompt=6, pad=2, decode_steps=0)
    expected = greedy_generate(OrtSession(path), inputs.input_ids, inputs.attention_mask, max_new_tokens=10)
    got = greedy_generate(OrtSession(path, kv_buffer=16), inputs.input_ids, inputs.attention_mask, max_new_tokens=10)
    np.testing.assert_array_equal(got, expected)


def test_ort_cache_reuses_ort_values(fast_graphs):
    """ort_cache=True hands the presents back as OrtValues and accepts them as the next past (parity
    copies them out to compare: tests/test_device_kv.py)."""
    model = sliced_model("qwen2")
    session = OrtSession(fast_graphs("qwen2", "sliced"), ort_cache=True)
    inputs = make_inputs(VOCAB, decode_steps=2)
    result = run_steps(session, inputs)
    assert session.plan.to_host == ("logits",) and isinstance(result.steps[-1].present[0][0], np.ndarray)
    reference = run_steps(TorchSession(model), inputs)
    for ref, got in zip(reference.steps, result.steps):
        rows = ref.query_mask
        assert np.abs(ref.logits[rows] - got.logits[rows]).max() < 1e-4


def test_default_export_is_fast_verified_and_quantizes(tmp_path):
    from exporters.quantize import quantize_onnx

    model = sliced_model("llama")
    result = export_onnx(model, tmp_path / "onnx")
    graph = result.report["graph"]
    assert graph["kind"] == "fast" and graph["fallback_reason"] is None
    assert graph["parity"]["passed"] and graph["parity"]["summary"]["logits_max_abs"] < graph["parity"]["summary"]["limit"]
    assert result.config["graph"] == "fast"
    assert result.report["fused_norms"] == result.report["model_norms"]
    q = quantize_onnx(result.out_dir, tmp_path / "int4", mode="int4", block_size=16, parity=False)
    counts = q.report["op_counts"]["quantized"]
    assert counts["GroupQueryAttention"] == model.config.num_hidden_layers
    assert counts.get("MatMul", 0) == 0 and counts["MatMulNBits"] > 0
    # the residual readers (shortcuts, lm_head) stay at 8 bits: the fast graph names its MatMuls' modules
    assert q.report["quantization"]["matmul_bits"].get("8", 0) >= 2
    session = OrtSession(q.out_dir)
    logits, _ = session.run(np.array([[5, 6, 7]]), np.ones((1, 3), np.int64), np.arange(3)[None], session.empty_past(1))
    assert np.isfinite(logits).all()


def test_export_falls_back_where_fast_cannot_be_exact(tmp_path, caplog):
    """Sliding windows, MoDeGPT head dims: the basic graph, with the reason recorded and logged."""
    mistral = sliced_model("mistral").config
    assert "sliding-window" in ort_fusion.unsupported_reason(mistral)
    assert choose_graph(mistral, ExportOptions()) == ("basic", ort_fusion.unsupported_reason(mistral))
    assert choose_graph(mistral, ExportOptions(dtype="fp16"))[0] == "basic"
    assert choose_graph(sliced_model("llama").config, ExportOptions(dtype="fp16")) == ("fast", None)
    assert choose_graph(sliced_model("llama").config, ExportOptions(optimize=False)) == ("none", None)
    assert choose_graph(sliced_model("llama").config, ExportOptions(optimize="basic")) == ("basic", None)
    modegpt = SlicedConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=96, qk_head_dims=[16, 8], v_head_dims=[16, 12])
    assert "q/k head dim 8 ≠ v head dim 12" in ort_fusion.unsupported_reason(modegpt)
    odd = SlicedConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, qk_head_dims=[16, 12], v_head_dims=[16, 12])
    assert "head dim 12; GroupQueryAttention needs a multiple of 8" in ort_fusion.unsupported_reason(odd)
    with pytest.raises(ValueError, match="cannot express"):
        ort_fusion.build_fast_graph(SlicedForCausalLM(modegpt))
    with caplog.at_level("WARNING", logger="exporters.onnx"):
        result = export_onnx(sliced_model("mistral"), tmp_path / "mistral", ExportOptions(exporter="torchscript"))
    assert result.report["graph"]["kind"] == "basic" and "sliding-window" in result.report["graph"]["fallback_reason"]
    assert "fast ORT graph not used" in caplog.text
    with pytest.raises(InvalidOptionError, match="GroupQueryAttention"):
        OrtSession(result.out_dir, kv_buffer=16)


def test_fp16_export_is_fast_and_verified_at_the_fp16_bar(tmp_path):
    model = sliced_model("qwen2")
    result = export_onnx(model, tmp_path / "onnx", ExportOptions(dtype="fp16"))
    graph = result.report["graph"]
    assert graph["kind"] == "fast" and graph["fallback_reason"] is None
    assert graph["parity"]["passed"] and graph["parity"]["dtype"] == "fp16"
    assert graph["parity"]["summary"]["cosine"] >= graph["parity"]["summary"]["cosine_min"] == 0.995
    assert result.config["graph"] == "fast" and result.config["dtype"] == "fp16"
    assert result.config["kv_cache_dtype"] == "float16" and result.config["logits_dtype"] == "float32"
    assert "fp16" not in result.report["op_counts"]  # emitted in fp16: no conversion pass ran
    assert result.report["op_counts"]["final"]["GroupQueryAttention"] == model.config.num_hidden_layers


def test_fp16_fast_graph_off_the_bar_falls_back_with_the_reason(tmp_path, caplog):
    """Activations beyond fp16's range (embedding rows ~1e5): the fp16 fast graph overflows, its
    parity check against torch fails, and the export writes the basic graph saying why."""
    import copy

    import torch

    model = copy.deepcopy(sliced_model("llama"))
    with torch.no_grad():
        model.embed_tokens.weight.mul_(1e6)
    with caplog.at_level("WARNING", logger="exporters.onnx"):
        result = export_onnx(model, tmp_path / "onnx", ExportOptions(dtype="fp16", exporter="torchscript"))
    graph = result.report["graph"]
    assert graph["kind"] == "basic" and not graph["parity"]["passed"]
    assert graph["fallback_reason"].startswith("the fast graph missed the fp16 parity bar")
    assert "fast ORT graph not used" in caplog.text and "fp16 parity bar" in caplog.text
    assert result.config["graph"] == "basic" and result.config["dtype"] == "fp16"


@pytest.mark.parametrize("act", list(ort_fusion.ACTIVATIONS))
def test_every_fused_activation_has_a_cpu_fp16_kernel(act, tmp_path):
    """Each activation op the fast graph can emit loads and runs in fp16 on ORT's CPU provider, and
    the fp16 graph passes the fp16 bar against torch."""
    import torch

    config = SlicedConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=96, hidden_act=act)
    torch.manual_seed(0)
    model = SlicedForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.15)
    path = tmp_path / "act.onnx"
    onnx.save(ort_fusion.build_fast_graph(model, dtype="fp16"), str(path))
    report = check_parity(TorchSession(model), OrtSession(path), "fp16", vocab_size=VOCAB)
    assert report["passed"] and report["summary"]["logits"]["max_abs"] < 3e-2, report["checks"]


def test_a_fast_graph_onnxruntime_cannot_load_falls_back_with_the_reason(tmp_path, monkeypatch):
    """Were a provider to lack a kernel for an op at the export's dtype, ORT refuses the graph at load:
    the export says so and writes the basic graph (simulated by an op ORT has no kernel for)."""
    real = ort_fusion.build_fast_graph

    def without_kernel(model, opset=20, dtype="fp32"):
        graph = real(model, opset, dtype)
        next(n for n in graph.graph.node if n.op_type == "GroupQueryAttention").op_type = "NoSuchAttention"
        return graph

    monkeypatch.setattr(ort_fusion, "build_fast_graph", without_kernel)
    result = export_onnx(sliced_model("llama"), tmp_path / "onnx", ExportOptions(dtype="fp16", exporter="torchscript"))
    graph = result.report["graph"]
    assert graph["kind"] == "basic" and graph["parity"] is None
    assert graph["fallback_reason"].startswith("onnxruntime cannot load the fp16 fast graph (")
    assert "NoSuchAttention" in graph["fallback_reason"]


def test_unknown_optimize_value_is_refused(tmp_path):
    with pytest.raises(InvalidOptionError, match="--optimize"):
        export_onnx(sliced_model("llama"), tmp_path / "x", ExportOptions(optimize="turbo"))


@pytest.mark.slow
def test_smollm2_fast_export_greedy_equals_torch(tmp_path):
    """SmolLM2-135M dense: 64 greedy tokens of the fp32 fast export equal eager torch's."""
    from toolchain.data.sources import load_hf_model, resolve_model

    hf, _ = load_hf_model(resolve_model("smollm2-135m"))
    model = to_canonical(hf, source_model="smollm2-135m").eval()
    result = export_onnx(model, tmp_path / "onnx")
    assert result.report["graph"]["kind"] == "fast"
    prompt = np.random.default_rng(0).integers(100, 40000, (1, 128), dtype=np.int64)
    expected = greedy_generate(TorchSession(model), prompt, max_new_tokens=64)
    for session in (OrtSession(result.out_dir), OrtSession(result.out_dir, kv_buffer=200)):
        np.testing.assert_array_equal(greedy_generate(session, prompt, max_new_tokens=64), expected)


@pytest.mark.slow
def test_smollm2_fp16_fast_export_passes_the_fp16_bar(tmp_path):
    """SmolLM2-135M dense: the fp16 fast graph is kept (verified at export) and passes the fp16 bar on
    three more input draws; real logits meet near-ties that strict top-1 alone would call failures."""
    from runtime.parity import make_inputs
    from toolchain.data.sources import load_hf_model, resolve_model

    hf, _ = load_hf_model(resolve_model("smollm2-135m"))
    model = to_canonical(hf, source_model="smollm2-135m").eval()
    result = export_onnx(model, tmp_path / "onnx", ExportOptions(dtype="fp16"))
    assert result.report["graph"]["kind"] == "fast" and result.report["graph"]["parity"]["passed"]
    session = OrtSession(result.out_dir)
    for seed in (1, 2, 3):
        report = check_parity(TorchSession(model), session, "fp16", make_inputs(model.config.vocab_size, seed=seed))
        assert report["passed"], report["checks"]
        assert report["summary"]["logits"]["cosine"] > 0.9999 and report["summary"]["logits"]["max_abs"] < 0.5


def kept_pairs_model(seed: int = 0):
    """Reduced q/k heads as MoDeGPT leaves them: each KV head rotates its own kept RoPE frequencies
    (out of order across heads, some dropped), with non-rotary dims left over; 8-multiple head dims."""
    import torch

    config = SlicedConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, intermediate_size=96, max_position_embeddings=128,
                          qk_head_dims=[24, 16, 32], v_head_dims=[24, 16, 32],
                          rope_pair_index=[[[0, 2, 5, 7, 9, 15], [1, 3, 4, 6, 8, 10]], [[0, 11, 12, 13], [2, 3, 7, 14]],
                                           None])
    torch.manual_seed(seed)
    model = SlicedForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.15)
    return model


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_per_head_rope_pairs_are_exact_in_the_fast_graph(tmp_path, dtype):
    """rope_pair_index (a frequency per kept pair, per KV head) and a rotary dim below the head dim:
    still GroupQueryAttention + RotaryEmbedding, equal to torch with left padding, prefill and decode,
    and with the in-place KV buffer (fp16: within the fp16 bar)."""
    model = kept_pairs_model()
    assert ort_fusion.unsupported_reason(model.config) is None
    path = tmp_path / "pairs.onnx"
    onnx.save(ort_fusion.build_fast_graph(model, dtype=dtype), str(path))
    counts = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    assert counts["GroupQueryAttention"] == counts["RotaryEmbedding"] / 2 == 3
    for session in (OrtSession(path), OrtSession(path, kv_buffer=24)):
        report = check_parity(TorchSession(model), session, dtype, vocab_size=VOCAB)
        assert report["passed"], report["checks"]
        assert report["summary"]["present"]["max_abs"] < (1e-4 if dtype == "fp32" else 2e-2)
