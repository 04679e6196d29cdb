"""Every TensorRT call that reports failure through its return value is checked, in build_engine and in
TensorRTSession, and a failure becomes one TensorRTCallError naming the call and the tensor.

The `tensorrt` module here is a RECORDING FAKE, not a TensorRT emulation: it builds nothing and computes
nothing. Each method records its call and returns TensorRT's success value (True, an index, an object),
or, for the one method a test names, TensorRT's failure value (False, -1, None, unresolved names). The
real API is exercised by the GPU tests in test_tensorrt.py, which skip here (no CUDA, no TensorRT).
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from exporters.tensorrt.engine import build_engine
from runtime.trt_calls import TensorRTCallError, check
from toolchain.core.errors import ArtifactError
from toolchain.core.fileio import sha256_file

VOCAB = 32
INPUTS = ("input_ids", "attention_mask", "position_ids")
RANGE = ((1, 1), (1, 8), (4, 16))  # min/opt/max of every [batch, tokens] input
# What each status-returning method returns on failure, as TensorRT's Python API documents it.
FAILURE = {
    "create_network": None, "create_builder_config": None, "add_optimization_profile": -1,
    "create_timing_cache": None, "set_timing_cache": False, "get_timing_cache": None,
    "build_serialized_network": None, "deserialize_cuda_engine": None, "create_execution_context": None,
    "set_optimization_profile_async": False, "set_input_shape": False, "set_tensor_address": False,
    "infer_shapes": ["logits"], "execute_async_v3": False,
}
BUILD_CALLS = ("create_network", "create_builder_config", "add_optimization_profile", "create_timing_cache",
               "set_timing_cache", "build_serialized_network", "get_timing_cache")
SESSION_CALLS = ("create_execution_context", "set_optimization_profile_async", "set_input_shape",
                 "set_tensor_address", "infer_shapes", "execute_async_v3")


def recording_tensorrt(fail: str | None = None) -> types.ModuleType:
    """The fake `tensorrt` module; `trt.calls` lists (method, args) in call order."""
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.calls = "10.15.1", []
    trt.float32, trt.int64 = "FLOAT", "INT64"  # distinct tokens; the session maps them to torch dtypes
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")

    def record(method: str, success, *args):
        trt.calls.append((method, args))
        return FAILURE[method] if method == fail else success

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level):
            pass

    class Profile:
        def set_shape(self, name, low, opt, high):  # the binding returns None and raises on bad input
            trt.calls.append(("set_shape", (name, low, opt, high)))

    class Network:
        num_inputs = len(INPUTS)

        def get_input(self, i):
            return types.SimpleNamespace(name=INPUTS[i])

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return record("parse_from_file", True, path)

    class Cache:
        def serialize(self):
            return b"cache"

    class Config:
        profiles = 0

        def set_memory_pool_limit(self, pool, size):
            trt.calls.append(("set_memory_pool_limit", (pool, size)))

        def add_optimization_profile(self, profile):
            self.profiles += 1
            return record("add_optimization_profile", self.profiles - 1, profile)

        def create_timing_cache(self, data):
            return record("create_timing_cache", Cache(), data)

        def set_timing_cache(self, cache, ignore_mismatch):
            return record("set_timing_cache", True, cache, ignore_mismatch)

        def get_timing_cache(self):
            return record("get_timing_cache", Cache())

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return record("create_network", Network(), flags)

        def create_builder_config(self):
            return record("create_builder_config", Config())

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return record("build_serialized_network", b"engine", network, config)

    class Context:
        def __init__(self):
            self.shapes = {}

        def set_optimization_profile_async(self, index, stream):
            return record("set_optimization_profile_async", True, index, stream)

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return record("set_input_shape", True, name, shape)

        def set_tensor_address(self, name, address):
            return record("set_tensor_address", True, name, address)

        def infer_shapes(self):
            return record("infer_shapes", [])

        def get_tensor_shape(self, name):
            return (*self.shapes["input_ids"], VOCAB) if name == "logits" else self.shapes[name]

        def execute_async_v3(self, stream):
            return record("execute_async_v3", True, stream)

    class Engine:
        names = (*INPUTS, "logits")
        num_io_tensors, num_optimization_profiles = len(names), 1

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.OUTPUT if name == "logits" else trt.TensorIOMode.INPUT

        def get_tensor_dtype(self, name):
            return trt.float32 if name == "logits" else trt.int64

        def get_tensor_shape(self, name):
            return (-1, -1, VOCAB) if name == "logits" else (-1, -1)

        def get_tensor_profile_shape(self, name, index):
            return RANGE

        def create_execution_context(self):
            return record("create_execution_context", Context())

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return record("deserialize_cuda_engine", Engine(), blob)

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device as probe_environment sees it; returns a function installing a fake tensorrt."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.version, "cuda", "12.8")

    def install(fail: str | None = None):
        trt = recording_tensorrt(fail)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt
    return install


@pytest.fixture
def bundle(tmp_path):
    """The files build_engine reads: trt_build.json and the (hashed) graph files the fake never parses."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        (folder / name).write_bytes(name.encode())
    shapes = {name: dict(zip(("min", "opt", "max"), map(list, RANGE))) for name in INPUTS}
    config = {"onnx": "model.onnx", "workspace_bytes": 2**30,
              "sha256": {name: sha256_file(folder / name) for name in ("model.onnx", "model.onnx.data")},
              "profiles": [{"name": "prefill", "dims": {}, "shapes": shapes}]}
    (folder / "trt_build.json").write_text(json.dumps(config))
    return folder


def _session(engine_dir):
    from runtime.trt_session import TensorRTSession

    return TensorRTSession(engine_dir / "model.plan", device="cpu")


def _feeds(batch=2, tokens=5):
    ids = torch.ones((batch, tokens), dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": ids.clone(), "position_ids": torch.cumsum(ids, 1) - 1}


def test_check_passes_success_values_and_rejects_failure_values():
    assert check(True, "x", "y") is True and check(0, "x", "y") == 0 and check([], "x", "y") == []
    for failure in (False, None, -1, ["logits"]):
        with pytest.raises(TensorRTCallError, match=r"TensorRT set_input_shape\('ids'\) failed.*: the cause"):
            check(failure, "set_input_shape('ids')", "the cause")


def test_every_status_returning_call_is_made_and_succeeds(fake_gpu, bundle):
    trt = fake_gpu()
    result = build_engine(bundle)
    assert result.engine_path == bundle / "engine" / "model.plan"
    assert (bundle / "engine" / "timing.cache").read_bytes() == b"cache"
    session = _session(bundle / "engine")
    outputs = session.run_device(_feeds())
    assert tuple(outputs["logits"].shape) == (2, 5, VOCAB)
    called = {method for method, _ in trt.calls}
    # Each status-returning call the code makes is one the failure tests below make fail.
    assert called & set(FAILURE) == set(FAILURE) == set(BUILD_CALLS) | set(SESSION_CALLS) | {"deserialize_cuda_engine"}
    bound = {args[0] for method, args in trt.calls if method == "set_tensor_address"}
    assert bound == {*INPUTS, "logits"}
    assert next(args[1] for method, args in trt.calls if method == "set_timing_cache") is False  # ignore_mismatch


@pytest.mark.parametrize("method", BUILD_CALLS)
def test_build_engine_raises_one_clear_error_per_failed_call(fake_gpu, bundle, method):
    fake_gpu(fail=method)
    with pytest.raises(ArtifactError) as err:
        build_engine(bundle)
    message = str(err.value)
    assert "\n" not in message
    if method == "build_serialized_network":  # TensorRT logs why; the message says how to see it
        assert "failed to build" in message and "--verbose" in message
    else:
        assert isinstance(err.value, TensorRTCallError) and f"TensorRT {method}" in message
    if method == "set_timing_cache":
        assert "timing.cache was written on another GPU or TensorRT version; delete it" in message
    if method == "add_optimization_profile":
        assert "profile 'prefill'" in message
    assert not (bundle / "engine" / "model.plan").exists()


@pytest.mark.parametrize("method", ("set_optimization_profile_async", "set_input_shape", "set_tensor_address",
                                    "infer_shapes", "execute_async_v3"))
def test_session_raises_one_clear_error_per_failed_call(fake_gpu, bundle, method):
    fake_gpu()
    build_engine(bundle)
    fake_gpu(fail=method)
    session = _session(bundle / "engine")
    with pytest.raises(TensorRTCallError) as err:
        session.run_device(_feeds())
    message = str(err.value)
    assert f"TensorRT {method}" in message and "\n" not in message
    if method in ("set_input_shape", "set_tensor_address"):
        assert "'input_ids'" in message  # the first tensor bound is named
    if method == "set_input_shape":
        assert "(2, 5)" in message and "outside profile 'prefill'" in message
    assert session.profiles_used == []  # a failed call is not counted as a run


def test_session_creation_failures_are_one_clear_error(fake_gpu, bundle):
    fake_gpu()
    build_engine(bundle)
    fake_gpu(fail="create_execution_context")
    with pytest.raises(TensorRTCallError, match="TensorRT create_execution_context failed: no device memory"):
        _session(bundle / "engine")
    fake_gpu(fail="deserialize_cuda_engine")
    with pytest.raises(ArtifactError, match="does not deserialize with TensorRT 10.15.1; rebuild it"):
        _session(bundle / "engine")


def test_a_timing_cache_from_another_gpu_is_not_offered_to_tensorrt(fake_gpu, bundle, monkeypatch):
    trt = fake_gpu()
    build_engine(bundle)
    (bundle / "engine" / "timing.cache").write_bytes(b"from this gpu")
    build_engine(bundle)
    offered = [args[0] for method, args in trt.calls if method == "create_timing_cache"]
    assert offered == [b"", b"from this gpu"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Another GPU")  # engine.json's key differs
    (bundle / "engine" / "timing.cache").write_bytes(b"from the fake gpu")
    trt = fake_gpu()
    build_engine(bundle)
    assert [args[0] for method, args in trt.calls if method == "create_timing_cache"] == [b""]
