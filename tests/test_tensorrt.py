"""TensorRT target. Here: the bundle of every arch (files, profiles vs the parity harness's shapes, the
static parser check, its fp16 ONNX replayed on ORT CPU against the stored torch outputs), the checker
failing on unsupported ops, and the one-line no-TensorRT message. Where CUDA + TensorRT exist: the
engine builds, matches torch fp16, and decodes across the prefill → decode profile switch."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from export_cases import export_root, sliced_model
from exporters.onnx import trace_onnx
from exporters.tensorrt import (BundleResult, build_engine, build_engine_if_available, check_bundle,
                                covering_profile, probe_environment, read_build_config, step_shapes, write_bundle)
from exporters.tensorrt.cli import cli
from exporters.trt_ops import check_graph
from runtime.parity import make_inputs
from runtime.trt_session import tensorrt_provider_options, validate_bundle
from tiny_models import ARCHS, VOCAB
from toolchain.core.errors import ArtifactError, BackendUnavailableError, InvalidOptionError, OutputPathError

TRT_REASON = probe_environment().reason
needs_trt = pytest.mark.skipif(TRT_REASON is not None, reason=f"needs CUDA + TensorRT here: {TRT_REASON}")
_BUNDLES: dict[tuple, BundleResult] = {}


def bundle_for(arch: str, factory, **limits) -> BundleResult:
    """The TRT bundle of `arch` sliced at 0.3, written once per session (the torch trace is shared with
    the ONNX export tests through export_cases' root)."""
    key = (arch, tuple(sorted(limits.items())))
    if key not in _BUNDLES:
        root = export_root(factory) / arch
        raw = root / "traced.onnx"
        if not raw.exists():
            root.mkdir(parents=True, exist_ok=True)
            trace_onnx(sliced_model(arch), raw)
        sliced = root / "sliced-for-trt"
        if not sliced.exists():
            sliced_model(arch).save_pretrained(sliced)
            (sliced / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')  # must ride along
        name = "trt" + "".join(f"-{k}{v}" for k, v in sorted(limits.items()))
        _BUNDLES[key] = write_bundle(sliced, root / name, traced=raw, **limits)
    return _BUNDLES[key]


@pytest.fixture(scope="module", params=ARCHS)
def arch_bundle(request, tmp_path_factory) -> tuple[str, BundleResult]:
    return request.param, bundle_for(request.param, tmp_path_factory)


def test_bundle_holds_everything_the_target_needs(arch_bundle):
    arch, result = arch_bundle
    out = result.out_dir
    for name in ("model.onnx", "model.onnx.data", "trt_build.json", "compat_report.json", "config.json",
                 "export_config.json", "tokenizer_config.json", "README.md", "parity/inputs.npz",
                 "parity/expected.npz", "parity/parity.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*")), "scratch files left in the bundle"
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.graph.input, *graph.graph.output)}
    assert types["past_key_values.0.key"] == types["present.0.value"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT and types["input_ids"] == onnx.TensorProto.INT64

    config = read_build_config(out)
    assert config["dtype"] == "fp16" and config["strongly_typed"] and config["workspace_bytes"] == 4 * 2**30
    assert [p["name"] for p in config["profiles"]] == ["prefill", "decode"]
    readme = (out / "README.md").read_text()
    assert f"python -m exporters.tensorrt build {out}" in readme
    trtexec = config["commands"]["trtexec"]
    assert trtexec.startswith("mkdir -p engine && trtexec --onnx=model.onnx --stronglyTyped ") and trtexec in readme
    assert "--profile=0 (prefill), --profile=1 (decode)" in readme.replace("`", "")
    assert "past_key_values.0.key:1x" in trtexec
    assert result.sizes["model.onnx.data"] > 0


def trtexec_argv(line: str) -> tuple[list[str], list[str]]:
    """(setup argv, trtexec argv) of the printed line: an optional `mkdir -p DIR &&` then trtexec."""
    setup, _, command = line.rpartition(" && ")
    return shlex.split(setup), shlex.split(command)


def test_printed_trtexec_line_follows_trtexecs_parser(tmp_path_factory, standin_trt, tmp_path):
    """trtexec (sampleOptions.cpp) reads several profiles only as `--profile=N` directly followed by that
    profile's shape flags, rejects a second shape set outside --profile, does not create --saveEngine's
    directory; and the timing cache it writes is the one build_engine reads."""
    _, bundle = standin_trt
    config = read_build_config(bundle)
    setup, argv = trtexec_argv(config["commands"]["trtexec"])
    assert argv[:3] == ["trtexec", "--onnx=model.onnx", "--stronglyTyped"]
    flags = [arg.split("=", 1) for arg in argv[1:]]
    names = [name for name, *_ in flags]
    starts = [i for i, name in enumerate(names) if name == "--profile"]
    assert [flags[i][1] for i in starts] == [str(n) for n in range(len(config["profiles"]))] == ["0", "1"]
    for profile, i in zip(config["profiles"], starts):
        assert names[i + 1:i + 4] == ["--minShapes", "--optShapes", "--maxShapes"]
        for (_, spec), key in zip(flags[i + 1:i + 4], ("min", "opt", "max")):
            parsed = {name: [int(d) for d in dims.split("x")] for name, dims in
                      (item.rsplit(":", 1) for item in spec.split(","))}
            assert parsed == {name: shapes[key] for name, shapes in profile["shapes"].items()}
    shape_flags = [i for i, name in enumerate(names) if name.endswith("Shapes")]
    assert shape_flags == [i + k for i in starts for k in (1, 2, 3)]  # none outside a profile
    options = {name: value for name, *value in flags if name not in ("--profile", "--minShapes", "--optShapes",
                                                                      "--maxShapes")}
    engine = Path(options["--saveEngine"][0])
    assert engine == Path("engine/model.plan")
    assert setup == ["mkdir", "-p", str(engine.parent)]  # trtexec saves into an existing dir only

    copy = tmp_path / "bundle"  # build_engine's default output dir is the one trtexec's paths name
    shutil.copytree(bundle, copy)
    build_engine(copy)
    assert (copy / engine).is_file()
    assert (copy / options["--timingCacheFile"][0]).read_bytes() == b"timing:"
    assert json.loads((copy / "engine" / "engine.json").read_text())["timing_cache"] == \
        Path(options["--timingCacheFile"][0]).name


def test_profiles_cover_the_parity_harness_shapes(arch_bundle):
    arch, result = arch_bundle
    config = read_build_config(result.out_dir)
    model_config = sliced_model(arch).config
    kv = config["kv_cache"]
    assert kv["key_head_dims"] == list(model_config.qk_head_dims)
    assert kv["value_head_dims"] == list(model_config.v_head_dims)
    profiles = config["profiles"]
    graph = onnx.load(str(result.model_path), load_external_data=False)
    for profile in profiles:
        assert set(profile["shapes"]) == {i.name for i in graph.graph.input}
        for layer, (key_dim, value_dim) in enumerate(zip(kv["key_head_dims"], kv["value_head_dims"])):
            assert profile["shapes"][f"past_key_values.{layer}.key"]["max"][3] == key_dim
            assert profile["shapes"][f"past_key_values.{layer}.value"]["min"][3] == value_dim

    inputs = make_inputs(VOCAB)  # what check_parity uses: batch 2, prompt 12, 3 decode steps
    batch, prompt = inputs.input_ids.shape
    prefill = step_shapes(batch, prompt, 0, kv)
    assert covering_profile(profiles, prefill, prefer="prefill")["name"] == "prefill"
    for step in range(inputs.decode_ids.shape[1]):
        decode = step_shapes(batch, 1, prompt + step, kv)
        assert covering_profile(profiles, decode, prefer="decode")["name"] == "decode"
        assert covering_profile([profiles[0]], decode) is None  # a real profile switch on the engine
    assert covering_profile([profiles[1]], prefill) is None
    plan = json.loads((result.out_dir / "parity" / "parity.json").read_text())["steps"]
    assert [s["profile"] for s in plan] == ["prefill", "decode", "decode", "decode"]


def test_static_check_passes_on_our_graph(arch_bundle):
    _, result = arch_bundle
    assert result.compat.passed, result.compat.problems
    report = json.loads((result.out_dir / "compat_report.json").read_text())
    assert report["passed"] and report["target"] == "TensorRT 10.15" and report["checked"]["profiles"] == 2
    assert report["checked"]["untyped_tensors"] == 0
    assert "SimplifiedLayerNormalization" not in report["op_counts"]
    assert check_bundle(result.out_dir).passed


def test_bundle_onnx_on_ort_matches_stored_torch_outputs(arch_bundle, tmp_path):
    _, result = arch_bundle
    report = validate_bundle(result.out_dir, backend="onnxruntime", report_dir=tmp_path)
    assert [s["step"] for s in report["steps"]] == ["prefill", "decode1", "decode2", "decode3"]
    assert report["inputs"]["left_padding"] == [0, 3]
    assert report["summary"]["logits"]["top1"] >= 0.99 and report["summary"]["logits"]["finite"]
    assert report["passed"], report["checks"]
    assert (tmp_path / "parity.json").is_file() and (tmp_path / "parity.md").is_file()


def test_static_check_names_what_tensorrt_cannot_parse(tmp_path_factory):
    result = bundle_for("llama", tmp_path_factory)
    profiles = read_build_config(result.out_dir)["profiles"]
    base = onnx.load(str(result.model_path), load_external_data=False)

    unsupported = onnx.ModelProto.FromString(base.SerializeToString())
    unsupported.graph.node.append(onnx.helper.make_node("Unique", ["input_ids"], ["uniq"], name="uniq_node"))
    report = check_graph(unsupported, profiles)
    assert not report.passed and [p.op for p in report.problems] == ["Unique"]
    assert "Unique is listed as unsupported for TensorRT 10.15 (node 'uniq_node')" in report.summary()

    fused = onnx.ModelProto.FromString(base.SerializeToString())
    node = next(n for n in fused.graph.node if n.op_type == "Softmax")
    node.domain = "com.microsoft"
    fused.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    problems = check_graph(fused, profiles).problems
    assert problems[0].kind == "domain" and "com.microsoft" in problems[0].message

    double = onnx.ModelProto.FromString(base.SerializeToString())
    double.graph.node.append(onnx.helper.make_node("Cast", ["logits"], ["as_double"], to=onnx.TensorProto.DOUBLE))
    double.graph.node.append(onnx.helper.make_node("Sqrt", ["as_double"], ["root"], name="double_sqrt"))
    double.graph.output.append(onnx.helper.make_tensor_value_info("root", onnx.TensorProto.DOUBLE, None))
    messages = [p.message for p in check_graph(double, profiles).problems]
    assert any("Cast on DOUBLE" in m for m in messages) and any("Sqrt on DOUBLE" in m for m in messages)
    assert any("graph output root" in m for m in messages)

    narrow = json.loads(json.dumps(profiles))
    del narrow[0]["shapes"]["position_ids"]
    narrow[1]["shapes"]["attention_mask"]["max"][1] -= 1  # total no longer covers past + 1
    messages = [p.message for p in check_graph(base, narrow).problems]
    assert any("no shapes for input position_ids" in m for m in messages)
    assert any("total_sequence_length" in m for m in messages)

    runner = CliRunner()
    assert runner.invoke(cli, ["check", str(result.out_dir)]).exit_code == 0


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT and a GPU are here: the build succeeds instead")
def test_build_without_tensorrt_says_why_in_one_line(tmp_path_factory):
    result = bundle_for("llama", tmp_path_factory)
    bundle = result.out_dir
    proc = subprocess.run([sys.executable, "-m", "exporters.tensorrt", "build", str(bundle)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: TensorRT engine not built: ")
    assert TRT_REASON in lines[0]
    assert lines[0].endswith(f"on the target GPU run: python -m exporters.tensorrt build {bundle}")
    assert not (bundle / "engine").exists()

    outcome = build_engine_if_available(bundle)  # what `toolchain build --target trt` calls
    assert not outcome.built and outcome.message == lines[0].removeprefix("error: ")
    with pytest.raises(BackendUnavailableError, match="cannot run a TensorRT engine here"):
        validate_bundle(bundle, backend="tensorrt")


def test_write_bundle_refuses_bad_limits_and_existing_output(tmp_path_factory, tmp_path):
    result = bundle_for("llama", tmp_path_factory)
    sliced = result.out_dir.parent / "sliced-for-trt"
    with pytest.raises(OutputPathError, match="already exists"):
        write_bundle(sliced, result.out_dir)
    with pytest.raises(InvalidOptionError, match="max_prompt 100 must be in 1..max_context"):
        write_bundle(sliced, tmp_path / "b", max_prompt=100, max_context=64)
    with pytest.raises(InvalidOptionError, match="max_position_embeddings"):
        write_bundle(sliced, tmp_path / "b", max_context=4096)
    assert not (tmp_path / "b").exists()


def test_ort_tensorrt_provider_options_span_both_profiles(tmp_path_factory, tmp_path):
    result = bundle_for("llama", tmp_path_factory)
    options = tensorrt_provider_options(tmp_path / "cache", result.out_dir)
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert options["trt_fp16_enable"] is False  # the graph carries its own fp16/fp32 split
    limits = read_build_config(result.out_dir)["limits"]
    assert "past_key_values.0.key:1x2x0x" in options["trt_profile_min_shapes"]
    assert f"input_ids:{limits['max_batch']}x{limits['max_prompt']}" in options["trt_profile_max_shapes"]
    assert f"past_key_values.1.value:{limits['max_batch']}x2x{limits['max_context'] - 1}x" in \
        options["trt_profile_max_shapes"]


# --- on a CUDA GPU with TensorRT ----------------------------------------------------------------------

GPU_LIMITS = {"max_batch": 4, "max_prompt": 16, "max_context": 48}


@needs_trt
@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_engine_builds_and_matches_torch_fp16(arch, tmp_path_factory):
    import copy

    from runtime.parity import check_parity
    from runtime.sessions import TorchSession
    from runtime.trt_session import TensorRTSession

    bundle = bundle_for(arch, tmp_path_factory, **GPU_LIMITS).out_dir
    built = build_engine(bundle)
    assert built.engine_path.is_file() and (bundle / "engine" / "engine.json").is_file()
    assert [p["name"] for p in built.metadata["profiles"]] == ["prefill", "decode"]
    assert (bundle / "engine" / "timing.cache").is_file()
    reference = TorchSession(copy.deepcopy(sliced_model(arch)).half().cuda(), name="torch-fp16")
    session = TensorRTSession(bundle)
    report = check_parity(reference, session, "fp16", vocab_size=VOCAB)
    assert report["summary"]["logits"]["top1"] >= 0.99 and report["passed"], report["checks"]
    assert session.profiles_used == ["prefill", "decode", "decode", "decode"]
    assert validate_bundle(bundle, backend="tensorrt")["passed"]


@needs_trt
def test_engine_decodes_across_the_profile_boundary(tmp_path_factory):
    from runtime.parity import TOLERANCES, compare, run_steps
    from runtime.sessions import TorchSession
    from runtime.trt_session import TensorRTSession

    bundle = bundle_for("llama", tmp_path_factory, **GPU_LIMITS).out_dir
    if not (bundle / "engine" / "model.plan").is_file():
        build_engine(bundle)
    session = TensorRTSession(bundle)
    steps = GPU_LIMITS["max_context"] - GPU_LIMITS["max_prompt"]  # prompt at the prefill max, decode to the end
    inputs = make_inputs(VOCAB, batch=GPU_LIMITS["max_batch"], prompt=GPU_LIMITS["max_prompt"], decode_steps=steps)
    candidate = run_steps(session, inputs)
    reference = run_steps(TorchSession(sliced_model("llama")), inputs)
    report = compare(reference, candidate, TOLERANCES["fp16"], "fp16", inputs)
    assert report["passed"], report["checks"]
    assert session.profiles_used == ["prefill"] + ["decode"] * steps
    too_long = np.ones((1, GPU_LIMITS["max_prompt"] + 1), dtype=np.int64)  # past the prefill profile
    with pytest.raises(InvalidOptionError, match="outside every optimisation profile"):
        session.run(too_long, too_long, np.cumsum(too_long, axis=1) - 1, session.empty_past(1))


# --- the TensorRT code paths, driven through a stand-in `tensorrt` module (runs here) ------------------
# Not a substitute for the GPU tests above: it checks that build_engine and TensorRTSession call the
# documented API in a coherent order (flags, one profile per phase with every input, workspace, timing
# cache, shapes and addresses bound before execute) by executing the bundle's graph with ORT on CPU
# from the raw addresses the session binds.


def _standin_tensorrt():
    import ctypes
    import enum
    import types

    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.15.1"
    trt.calls = []
    DataType = enum.Enum("DataType", "FLOAT HALF INT64 INT32 BOOL")
    trt.float32, trt.float16, trt.int64, trt.int32, trt.bool = DataType
    numpy_of = {trt.float32: np.float32, trt.float16: np.float16, trt.int64: np.int64, trt.int32: np.int32,
                trt.bool: np.bool_}
    from_ort = {"tensor(float)": trt.float32, "tensor(float16)": trt.float16, "tensor(int64)": trt.int64}
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level):
            self.level = level

    class Profile(dict):
        def set_shape(self, name, low, opt, high):
            assert len(low) == len(opt) == len(high) and all(a <= b <= c for a, b, c in zip(low, opt, high))
            self[name] = (tuple(low), tuple(opt), tuple(high))

    class Network:
        def __init__(self, flags):
            trt.calls.append(("create_network", flags))
            self.inputs = []

        num_inputs = property(lambda self: len(self.inputs))

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            graph = onnx.load(path, load_external_data=False)
            self.network.inputs, self.network.path = [i.name for i in graph.graph.input], path
            return True

    class Config:
        def __init__(self):
            self.profiles, self.cache = [], None

        def set_memory_pool_limit(self, pool, size):
            trt.calls.append(("memory_pool", pool, size))

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return types.SimpleNamespace(serialize=lambda: b"timing:" + bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        create_network = staticmethod(Network)
        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            assert config.cache is not None and all(set(p) == set(network.inputs) for p in config.profiles)
            return json.dumps({"onnx": network.path, "profiles": config.profiles}).encode()

    def view(address, shape, dtype):
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if size == 0:
            return np.zeros(shape, dtype)
        return np.frombuffer((ctypes.c_char * size).from_address(address), dtype=dtype).reshape(shape)

    class Context:
        def __init__(self, engine):
            self.engine, self.profile, self.shapes, self.addresses, self.results = engine, 0, {}, {}, {}

        def set_optimization_profile_async(self, index, stream):
            self.profile = index
            return True

        def set_input_shape(self, name, shape):
            low, _, high = self.engine.get_tensor_profile_shape(name, self.profile)
            assert all(a <= s <= b for a, s, b in zip(low, shape, high)), (name, shape, "outside the profile")
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, address):
            self.addresses[name] = address
            return True

        def infer_shapes(self):
            feeds = {n: view(self.addresses[n], self.shapes[n], numpy_of[self.engine.dtypes[n]]).copy()
                     for n in self.engine.input_names}
            self.results = dict(zip(self.engine.output_names, self.engine.session.run(None, feeds)))
            return []

        def get_tensor_shape(self, name):
            return self.results[name].shape if name in self.results else self.shapes[name]

        def execute_async_v3(self, stream):
            for name, array in self.results.items():
                view(self.addresses[name], array.shape, array.dtype)[...] = array
            return True

    class Engine:
        def __init__(self, blob):
            spec = json.loads(blob)
            self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
            self.profiles = spec["profiles"]
            io = [*self.session.get_inputs(), *self.session.get_outputs()]
            self.input_names = [i.name for i in self.session.get_inputs()]
            self.output_names = [o.name for o in self.session.get_outputs()]
            self.names = [t.name for t in io]
            self.dtypes = {t.name: from_ort[t.type] for t in io}
            self.tensor_shapes = {t.name: tuple(d if isinstance(d, int) else -1 for d in t.shape) for t in io}

        num_io_tensors = property(lambda self: len(self.names))
        num_optimization_profiles = property(lambda self: len(self.profiles))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.input_names else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return self.dtypes[name]

        def get_tensor_shape(self, name):
            return self.tensor_shapes[name]

        def get_tensor_profile_shape(self, name, index):
            return self.profiles[index][name]

        def create_execution_context(self):
            return Context(self)

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=Engine)
    return trt


@pytest.fixture
def standin_trt(monkeypatch, tmp_path_factory):
    """(stand-in module, llama bundle); the bundle is written first, with the real torch."""
    import torch

    bundle = bundle_for("llama", tmp_path_factory).out_dir
    trt = _standin_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Stand-in GPU")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    return trt, bundle


def test_engine_build_and_session_through_a_standin_tensorrt(standin_trt, tmp_path, monkeypatch):
    from runtime import trt_session
    from runtime.parity import check_parity
    from runtime.sessions import TorchSession
    from runtime.trt_session import TensorRTSession

    standin_trt, bundle = standin_trt
    built = build_engine(bundle, out=tmp_path / "engine")
    assert ("create_network", 1 << 1) in standin_trt.calls  # STRONGLY_TYPED
    assert ("memory_pool", "workspace", 4 * 2**30) in standin_trt.calls
    meta = json.loads((tmp_path / "engine" / "engine.json").read_text())
    assert meta["key"] == "Stand-in_GPU-sm89-trt10.15.1-cuda12.8" and meta["strongly_typed"]
    assert [p["name"] for p in meta["profiles"]] == ["prefill", "decode"]
    assert {t["name"] for t in meta["io"] if t["mode"] == "output"} >= {"logits", "present.1.value"}
    assert (tmp_path / "engine" / "timing.cache").read_bytes() == b"timing:"
    build_engine(bundle, out=tmp_path / "engine")  # the second build starts from the stored timing cache
    assert (tmp_path / "engine" / "timing.cache").read_bytes() == b"timing:timing:"

    session = TensorRTSession(built.engine_path, device="cpu")
    assert session.vocab_size == VOCAB and [s.key_dim for s in session.kv_shapes] == [16, 16]
    report = check_parity(TorchSession(sliced_model("llama")), session, "fp16", vocab_size=VOCAB)
    assert report["passed"] and report["summary"]["present"]["max_abs"] < 0.05, report["checks"]
    assert session.profiles_used == ["prefill", "decode", "decode", "decode"]
    too_long = np.ones((1, read_build_config(bundle)["limits"]["max_prompt"] + 1), dtype=np.int64)
    with pytest.raises(InvalidOptionError, match="outside every optimisation profile"):
        session.run(too_long, too_long, np.cumsum(too_long, axis=1) - 1, session.empty_past(1))

    copy = tmp_path / "copied-bundle"  # a damaged copy fails before the (long) build starts
    shutil.copytree(bundle, copy)
    (copy / "model.onnx.data").write_bytes(b"truncated")
    with pytest.raises(ArtifactError, match="model.onnx.data differs from the file the bundle was written"):
        build_engine(copy)

    monkeypatch.setattr(trt_session, "open_trt_session", lambda path, name="tensorrt": TensorRTSession(
        tmp_path / "engine" / "model.plan", name, device="cpu"))
    assert validate_bundle(bundle, backend="tensorrt")["engine"]["profiles_used"][0] == "prefill"
