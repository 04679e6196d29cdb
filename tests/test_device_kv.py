"""Device-resident decode: the IO-binding plan keeps the KV cache where the device wrote it, so a CUDA
step moves only the token ids in and the logits out. On CPU the plan itself is checked (it is what
OrtSession binds by); the CUDA and TensorRT runs skip with the reason when there is no GPU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export_cases import sliced_model
from exporters import ort_fusion
from runtime.generate import KVStream
from runtime.parity import check_parity, make_inputs
from runtime.sessions import OrtSession, TorchSession, binding_plan, cuda_attention_blocker, host_past
from test_tensorrt import standin_trt  # noqa: F401  (fixture: a recording stand-in for the tensorrt module)
from tiny_models import VOCAB
from toolchain.core.iospec import LOGITS, TOKEN_INPUTS, input_names, output_names

LAYERS = 3
INPUTS, OUTPUTS = input_names(LAYERS), output_names(LAYERS)
KV_NAMES = [n for n in (*INPUTS, *OUTPUTS) if n not in (*TOKEN_INPUTS, LOGITS)]


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


needs_cuda_ep = pytest.mark.skipif("CUDAExecutionProvider" not in _ort_providers(),
                                   reason="onnxruntime has no CUDAExecutionProvider here (CPU-only build or no GPU)")


def test_cuda_plan_keeps_every_kv_tensor_on_the_device():
    plan = binding_plan(INPUTS, OUTPUTS, "cuda")
    assert len(KV_NAMES) == 4 * LAYERS
    assert all(plan.inputs[n] == "cuda" for n in KV_NAMES if n in plan.inputs)
    assert all(plan.outputs[n] == "cuda" for n in KV_NAMES if n in plan.outputs)
    assert plan.outputs[LOGITS] == "cpu" and plan.to_host == (LOGITS,)
    # per step: three small int64 inputs in, the logits out; no KV tensor crosses
    assert sorted(plan.host_copies()) == sorted([*TOKEN_INPUTS, LOGITS])
    assert not set(plan.host_copies()) & set(KV_NAMES)


def test_host_kv_plan_counts_the_cache_twice_per_step():
    """The copying plan (what OrtSession did on CUDA before): every past goes up and every present
    comes down each step, so the count above is not trivially small."""
    plan = binding_plan(INPUTS, OUTPUTS, "cuda", device_kv=False)
    copies = plan.host_copies()
    assert len(copies) == len(TOKEN_INPUTS) + 1 + 4 * LAYERS
    assert set(KV_NAMES) <= set(copies)


def test_cpu_plan_crosses_nothing_and_returns_numpy():
    plan = binding_plan(INPUTS, OUTPUTS, "cpu")
    assert plan.host_copies() == []
    assert set(plan.inputs.values()) == set(plan.outputs.values()) == {"cpu"}
    assert plan.to_host == tuple(OUTPUTS)  # the Session contract on CPU: numpy presents
    assert binding_plan(INPUTS, OUTPUTS, "cpu", device_kv=True).to_host == (LOGITS,)


def test_session_follows_the_plan_and_parity_reads_device_caches(tmp_path):
    """OrtSession binds by its plan: with the cache kept ORT-side (ort_cache=True, what CUDA does by
    default) the presents are OrtValues fed straight back, and parity copies them out only to
    compare; logits and every present still match torch."""
    import onnxruntime as ort

    model = sliced_model("qwen2")
    path = tmp_path / "fast.onnx"
    onnx.save(ort_fusion.build_fast_graph(model), str(path))
    assert OrtSession(path).plan.to_host == tuple(output_names(model.config.num_hidden_layers))
    session = OrtSession(path, ort_cache=True)
    assert session.plan.to_host == (LOGITS,)
    stream = KVStream.prompt(session, np.ones((1, 4), np.int64))
    stream.run(np.array([[5, 6, 7, 8]]))
    stream.decode(np.array([[9]]))
    assert all(isinstance(t, ort.OrtValue) for pair in stream.past for t in pair)
    assert host_past(stream.past)[0][0].shape[2] == 5
    report = check_parity(TorchSession(model), session, "fp32", vocab_size=VOCAB)
    assert report["passed"], report["checks"]
    assert report["summary"]["present"]["max_abs"] < 1e-4


def test_the_fast_graph_is_refused_on_cuda_with_the_reason():
    """ORT's CUDA GroupQueryAttention refuses attention_bias, which the fast graph uses for left
    padding: a CUDA session says so at open instead of failing at the first run. GroupQueryAttention
    without the bias (as onnxruntime-genai's builder emits it) is not refused."""
    from onnx import helper

    graph = ort_fusion.build_fast_graph(sliced_model("llama"), dtype="fp16").graph
    assert "attention_bias" in cuda_attention_blocker(graph.node)
    genai_style = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total", "cos", "sin"],
                                   ["out", "key", "value"], domain="com.microsoft")
    assert cuda_attention_blocker([genai_style]) is None


def test_a_gpu_build_exports_the_graph_its_provider_can_run():
    """`toolchain build --provider cuda|tensorrt` validates and benches onnx/ on that provider, so it
    exports the basic graph there (and the choice is part of the export stage's key); CPU builds keep
    the fast graph and their old key."""
    from toolchain.app.pipeline import STAGES, BuildOptions

    export = next(stage for stage in STAGES if stage.name == "export")
    assert export.options(BuildOptions(model="m", dtype="fp16")) == {"dtype": "fp16"}
    for provider in ("cuda", "tensorrt"):
        assert export.options(BuildOptions(model="m", dtype="fp16", provider=provider)) == {"dtype": "fp16",
                                                                                           "graph": "basic"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from export_cases import export_root

    return export_root(tmp_path_factory)


@needs_cuda_ep
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cuda_decode_keeps_the_cache_on_the_gpu_and_matches_torch(tmp_path, dtype, root):
    from export_cases import exported

    from toolchain.core.errors import ArtifactError

    model = sliced_model("llama")
    fast = tmp_path / f"{dtype}.onnx"
    onnx.save(ort_fusion.build_fast_graph(model, dtype=dtype), str(fast))
    with pytest.raises(ArtifactError, match="attention_bias"):
        OrtSession(fast, "cuda")
    path = exported("llama", dtype, root, optimize="basic")
    session = OrtSession(path, "cuda")
    assert session.ort_cache and session.plan.host_copies() == [*TOKEN_INPUTS, LOGITS]
    inputs = make_inputs(VOCAB)
    stream = KVStream.prompt(session, inputs.attention_mask)
    stream.run(inputs.input_ids)
    for t in range(inputs.decode_ids.shape[1]):
        stream.decode(inputs.decode_ids[:, t:t + 1])
    assert all(t.device_name().lower() == "cuda" for pair in stream.past for t in pair)
    report = check_parity(TorchSession(model), OrtSession(path, "cuda"), dtype, vocab_size=VOCAB)
    assert report["passed"], report["checks"]


def test_tensorrt_session_feeds_its_device_tensors_back(standin_trt, tmp_path):
    """TensorRTSession with device_kv (its default on CUDA) returns the presents as the torch tensors
    the engine wrote and binds them back as the next past, no numpy in between; parity copies them
    out to compare. Run on test_tensorrt's stand-in engine (torch ops on the CPU device)."""
    import torch

    from exporters.tensorrt import build_engine
    from runtime.trt_session import TensorRTSession

    _, bundle = standin_trt
    built = build_engine(bundle, out=tmp_path / "engine")
    assert TensorRTSession(built.engine_path, device="cpu").plan.to_host[-1] != LOGITS  # CPU: numpy presents
    session = TensorRTSession(built.engine_path, device="cpu", device_kv=True)
    assert session.plan.to_host == (LOGITS,)
    stream = KVStream.prompt(session, np.ones((1, 4), np.int64))
    stream.run(np.array([[5, 6, 7, 8]]))
    first = stream.past[0][0]
    stream.decode(np.array([[9]]))
    assert isinstance(first, torch.Tensor) and all(isinstance(t, torch.Tensor) for pair in stream.past for t in pair)
    assert stream.past[0][0].shape[2] == 5
    report = check_parity(TorchSession(sliced_model("llama")), session, "fp16", vocab_size=VOCAB)
    assert report["passed"], report["checks"]
