"""TensorRT as a Session: a bundle's engine behind the same interface as torch and onnxruntime, so
parity, generation and latency code run on it unchanged. Also: provider options for onnxruntime-gpu's
TensorRT execution provider, and `validate_bundle` (stored parity data → pass/fail) for the target GPU.

Buffers are torch CUDA tensors (no pycuda): inputs are bound with set_input_shape/set_tensor_address,
outputs are allocated at the shapes the context infers, and execute_async_v3 runs on the session's own
CUDA stream: TensorRT synchronises extra work when enqueued on the default stream, which would distort
latency. That stream waits for the caller's stream before reading the inputs, and the caller's stream
waits for it before using the outputs, so callers see ordinary stream semantics. Every TensorRT call
that reports failure by its return value goes through runtime.trt_calls.check. The optimisation profile
is picked per call: `prefill` for an empty cache, `decode` otherwise, any other profile whose ranges
hold the shapes as a fallback.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from toolchain.core.errors import ArtifactError, BackendUnavailableError, InvalidOptionError
from toolchain.core.fileio import write_json, write_text
from toolchain.core.iospec import (LOGITS, PAST_PREFIX, TOKEN_INPUTS, is_kv_name, past_feeds, past_kv_shapes, past_name,
                                   presents)

from runtime.sessions import KVShape, Past, Session, binding_plan
from runtime.trt_bundle import (BUILD_COMMAND, ENGINE_DIR, ENGINE_FILE, ENGINE_META, load_parity_data,
                                read_build_config)
from runtime.trt_calls import check
from runtime.trt_environment import probe_environment


class TensorRTSession(Session):
    """run(input_ids, attention_mask, position_ids, past) -> (logits fp32, present) on a TensorRT engine.

    `run_device` is the same call on CUDA tensors (KV cache stays on the GPU between steps)."""

    def __init__(self, path: str | Path, name: str = "tensorrt", device: int | str = 0, device_kv: bool | None = None):
        """`device`: CUDA device index (a torch device string runs a stand-in engine in tests).
        `device_kv` (default: on CUDA): `run` returns the presents as the device tensors TensorRT wrote
        and takes them back as the next past, so the cache never crosses to the host
        (runtime.sessions.binding_plan)."""
        import tensorrt as trt
        import torch

        self.engine_path, self.metadata = resolve_engine(path)
        _check_built_here(self.engine_path, self.metadata)
        self.name, self._torch = name, torch
        self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        logger = trt.Logger(trt.Logger.WARNING)
        cuda = self.device.type == "cuda"
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.engine_path.read_bytes())
            if self.engine is None:
                raise ArtifactError(f"{self.engine_path} does not deserialize with TensorRT {trt.__version__}; "
                                    f"rebuild it: {_rebuild_hint(self.engine_path)}")
            self.context = check(self.engine.create_execution_context(), "create_execution_context",
                                 f"no device memory for {self.engine_path}'s activations (free GPU memory, or "
                                 "rebuild the bundle with a smaller max_batch/max_context)")
            self._stream = torch.cuda.Stream(self.device) if cuda else None
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._dtypes = {n: _torch_dtype(trt, torch, self.engine.get_tensor_dtype(n)) for n in names}
        self.kv_shapes = _kv_layout(self.engine, self.inputs)
        self.kv_dtype = np.dtype(str(self._dtypes[past_name(0, "key")]).removeprefix("torch.")) \
            if self.kv_shapes else np.dtype(np.float16)
        self.vocab_size = self._vocab_size()
        self.profiles = self._profile_ranges()
        self.profiles_used: list[str] = []  # one entry per call: which profile ran it
        self.plan = binding_plan(self.inputs, self.outputs, self.device.type, device_kv)
        self._active: int | None = None
        self._empty = torch.empty(256, dtype=torch.uint8, device=self.device)  # address for 0-element tensors

    def run(self, input_ids, attention_mask, position_ids, past: Past) -> tuple[np.ndarray, Past]:
        torch = self._torch
        feeds = {**dict(zip(TOKEN_INPUTS, (input_ids, attention_mask, position_ids))), **past_feeds(past)}
        tensors = {name: (array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array)))
                   .to(self.device, self._dtypes[name]) for name, array in feeds.items() if name in self._dtypes}
        out = self.run_device(tensors)
        for name in self.plan.to_host:  # device_kv: the presents stay device tensors
            out[name] = out[name].float().cpu().numpy() if name == LOGITS else out[name].cpu().numpy()
        return out[LOGITS], presents(out, self.num_layers)

    def run_device(self, feeds: dict) -> dict:
        """{input name: CUDA tensor} -> {output name: CUDA tensor}, enqueued on the session's stream and
        ordered before whatever the caller's current stream does next."""
        torch = self._torch
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise InvalidOptionError(f"the engine needs inputs {missing}")
        shapes = {n: tuple(feeds[n].shape) for n in self.inputs}
        index = self.select_profile(shapes)
        profile = self.profiles[index]["name"]
        caller = torch.cuda.current_stream(self.device) if self._stream is not None else None
        if caller is not None:
            self._stream.wait_stream(caller)  # inputs written on the caller's stream are complete
        stream = self._stream.cuda_stream if self._stream is not None else 0
        if index != self._active:
            check(self.context.set_optimization_profile_async(index, stream),
                  f"set_optimization_profile_async({index})", f"profile {profile!r} is not in {self.engine_path}")
            self._active = index
        for name in self.inputs:
            tensor = feeds[name] = feeds[name].contiguous()
            check(self.context.set_input_shape(name, shapes[name]), f"set_input_shape({name!r}, {shapes[name]})",
                  f"the shape is outside profile {profile!r} of {self.engine_path} or has the wrong rank")
            self._bind(name, tensor)
        check(self.context.infer_shapes(), "infer_shapes", f"output shapes of {self.engine_path} cannot be inferred "
                                                           f"from the input shapes {shapes}")
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            tensor = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
            self._bind(name, tensor)
            outputs[name] = tensor
        check(self.context.execute_async_v3(stream), "execute_async_v3",
              f"enqueueing {self.engine_path} failed for input shapes {shapes} (profile {profile!r})")
        if caller is not None:
            for tensor in (*feeds.values(), *outputs.values()):
                tensor.record_stream(self._stream)  # the allocator must not reuse them while TensorRT runs
            caller.wait_stream(self._stream)  # the caller's next kernels (and .cpu()) see the outputs
        self.profiles_used.append(profile)
        return outputs

    def _bind(self, name: str, tensor) -> None:
        address = tensor.data_ptr() if tensor.numel() else self._empty.data_ptr()
        check(self.context.set_tensor_address(name, address), f"set_tensor_address({name!r})",
              f"the engine has no I/O tensor {name!r} or the address is not aligned for it")

    def select_profile(self, shapes: dict[str, tuple]) -> int:
        """Index of the profile for these input shapes: the phase's own profile when it fits, else any that does."""
        past = shapes.get(past_name(0, "key"), (0, 0, 0))[2] if self.kv_shapes else \
            shapes["attention_mask"][1] - shapes["input_ids"][1]
        phase = "prefill" if past == 0 else "decode"
        for profile in sorted(self.profiles, key=lambda p: p["name"] != phase):
            if all(len(s) == len(profile["ranges"][n][0]) and
                   all(lo <= d <= hi for d, lo, hi in zip(s, *profile["ranges"][n])) for n, s in shapes.items()):
                return profile["index"]
        limits = {p["name"]: {n: r for n, r in p["ranges"].items() if n in ("input_ids", "attention_mask")}
                  for p in self.profiles}
        raise InvalidOptionError(f"input shapes {shapes.get('input_ids')} (ids), {shapes.get('attention_mask')} (mask) "
                                 f"are outside every optimisation profile of {self.engine_path} ((min, max) per "
                                 f"profile: {limits}); rewrite the bundle with larger max_batch/max_prompt/max_context")

    def _profile_ranges(self) -> list[dict]:
        named = {p["index"]: p["name"] for p in self.metadata.get("profiles", [])}
        profiles = []
        for index in range(self.engine.num_optimization_profiles):
            ranges = {}
            for name in self.inputs:
                low, _, high = self.engine.get_tensor_profile_shape(name, index)
                ranges[name] = (tuple(low), tuple(high))
            profiles.append({"index": index, "name": named.get(index, f"profile{index}"), "ranges": ranges})
        return profiles

    def _vocab_size(self) -> int:
        width = self.engine.get_tensor_shape(LOGITS)[-1]
        if width > 0:
            return int(width)
        config = self.engine_path.parent.parent / "config.json"
        if config.is_file():
            return int(json.loads(config.read_text())["vocab_size"])
        raise ArtifactError(f"{self.engine_path}: the vocab size is neither static in the engine nor in config.json")


def resolve_engine(path: str | Path) -> tuple[Path, dict]:
    """(engine file, engine.json dict) from a bundle dir, its engine dir, or an engine file."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / ENGINE_DIR / ENGINE_FILE if (path / ENGINE_DIR).is_dir() else path / ENGINE_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist: build the engine on this GPU first ({_rebuild_hint(path)})")
    meta = path.parent / ENGINE_META
    return path, json.loads(meta.read_text()) if meta.is_file() else {}


def open_trt_session(path: str | Path, name: str = "tensorrt") -> TensorRTSession:
    """A TensorRTSession, or BackendUnavailableError saying why this machine cannot run engines."""
    env = probe_environment()
    if env.reason:
        raise BackendUnavailableError(f"cannot run a TensorRT engine here: {env.reason}; run this on the target GPU, "
                                      "or check the bundle's ONNX with --backend onnxruntime")
    return TensorRTSession(path, name=name)


def tensorrt_provider_options(cache_dir: str | Path, bundle: str | Path | None = None, fp16: bool = False) -> dict:
    """Options for onnxruntime-gpu's TensorrtExecutionProvider on a bundle's model.onnx:

        ort.InferenceSession(f"{bundle}/model.onnx",
                             providers=[("TensorrtExecutionProvider", tensorrt_provider_options(cache, bundle)),
                                        "CUDAExecutionProvider"])

    Engines and timing caches persist in `cache_dir` (ORT keys them by graph and profile). fp16 stays
    off: the graph is already fp16 with deliberate fp32 islands that TensorRT's fp16 flag would drop.
    With a bundle, one explicit profile spanning both of its phases (prefill and decode) is set.
    """
    cache = str(Path(cache_dir).expanduser())
    options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
               "trt_timing_cache_enable": True, "trt_timing_cache_path": cache, "trt_fp16_enable": fp16}
    if bundle is not None:
        config = read_build_config(bundle)
        profiles = config["profiles"]
        decode = next((p for p in profiles if p["name"] == "decode"), profiles[-1])
        merged = {"min": {}, "opt": {}, "max": {}}
        for name in profiles[0]["shapes"]:
            merged["min"][name] = [min(v) for v in zip(*(p["shapes"][name]["min"] for p in profiles))]
            merged["max"][name] = [max(v) for v in zip(*(p["shapes"][name]["max"] for p in profiles))]
            merged["opt"][name] = decode["shapes"][name]["opt"]  # decode is the latency-critical phase
        for key in ("min", "opt", "max"):
            spec = ",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in merged[key].items())
            options[f"trt_profile_{key}_shapes"] = spec
        options["trt_max_workspace_size"] = int(config["workspace_bytes"])
    return options


def validate_bundle(bundle: str | Path, backend: str = "tensorrt", provider: str = "cpu",
                    report_dir: str | Path | None = None) -> dict:
    """Replay the bundle's parity inputs (prefill + decode, the session's own KV cache) and compare the
    logits with the stored torch fp32 ones at fp16 tolerances. backend: tensorrt (the built engine) or
    onnxruntime (the bundle's fp16 ONNX, e.g. on CPU: proves the bundle and its parity data agree)."""
    from runtime.parity import TOLERANCES, RunnerResult, Step, compare, run_steps, to_markdown
    from runtime.sessions import OrtSession

    if backend not in ("tensorrt", "onnxruntime"):  # a mistyped option is reported before a missing bundle
        raise InvalidOptionError(f"unknown --backend {backend!r}; choose tensorrt or onnxruntime")
    bundle = Path(bundle).expanduser()
    config = read_build_config(bundle)
    inputs, expected = load_parity_data(bundle)
    if backend == "tensorrt":
        session = open_trt_session(bundle)
    else:
        session = OrtSession(bundle / config["onnx"], provider, name=f"onnxruntime-{provider} (bundle fp16 ONNX)")
    candidate = run_steps(session, inputs)
    if [s.name for s in candidate.steps] != list(expected):
        raise ArtifactError(f"{bundle}/parity: stored steps {list(expected)} do not match the inputs; rewrite "
                            "the bundle")
    # Only logits are stored (KV caches of a large model would be hundreds of MB), so compare logits only.
    reference = RunnerResult("torch-fp32 (stored)", [Step(s.name, expected[s.name], [], s.query_mask, s.key_mask)
                                                     for s in candidate.steps], 0.0)
    candidate = RunnerResult(candidate.runner, [Step(s.name, s.logits, [], s.query_mask, s.key_mask)
                                                for s in candidate.steps], candidate.seconds)
    report = compare(reference, candidate, TOLERANCES["fp16"], "fp16", inputs)
    report["bundle"], report["backend"] = str(bundle), backend
    if isinstance(session, TensorRTSession):
        report["engine"] = {**{k: session.metadata.get(k) for k in ("gpu", "tensorrt", "cuda", "key")},
                            "profiles_used": session.profiles_used}
    if report_dir is not None:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "parity.json", report)
        write_text(out / "parity.md", to_markdown(report))
    return report


def _check_built_here(engine_path: Path, metadata: dict) -> None:
    """Engines are tied to the GPU architecture and TensorRT version: say so instead of a deserialize error."""
    if not metadata:
        return
    env = probe_environment()
    built = (metadata.get("compute_capability"), metadata.get("tensorrt"))
    if built != (env.capability, env.tensorrt):
        raise ArtifactError(f"{engine_path} was built for compute capability {built[0]} with TensorRT {built[1]}; this "
                            f"machine has {env.capability} ({env.gpu}) with TensorRT {env.tensorrt}: rebuild it here "
                            f"({_rebuild_hint(engine_path)})")


def _rebuild_hint(engine_path: Path) -> str:
    bundle = engine_path.parent.parent if engine_path.parent.name == ENGINE_DIR else engine_path.parent
    return f"{BUILD_COMMAND} {bundle}"


def _torch_dtype(trt, torch, dtype):
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32,
             "int64": torch.int64, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
    for name, value in table.items():
        if getattr(trt, name, None) == dtype:
            return value
    raise ArtifactError(f"the engine has a tensor of type {dtype}, which this session cannot bind")


def _kv_layout(engine, inputs: list[str]) -> list[KVShape]:
    layers = past_kv_shapes({name: engine.get_tensor_shape(name) for name in inputs if is_kv_name(name, PAST_PREFIX)})
    return [KVShape(int(key[1]), int(key[3]), int(value[3])) for key, value in layers]
