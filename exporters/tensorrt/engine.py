"""Building the engine on the target GPU: parse the bundle's ONNX with TensorRT's parser into a strongly
typed network, build it with the bundle's profiles, and write engine/model.plan + engine/engine.json with
the timing cache (engine/timing.cache, shared with the bundle's trtexec line) beside them. `tensorrt` is
imported only inside the build; without it the build says in one line why and what to run. Every
TensorRT call that reports failure by its return value goes through runtime.trt_calls.check.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from toolchain import __version__
from toolchain.core.errors import ArtifactError, BackendUnavailableError, first_line
from toolchain.core.fileio import atomic_file, sha256_file, write_json

from runtime.trt_bundle import ENGINE_DIR, ENGINE_FILE, ENGINE_META, TIMING_CACHE, not_built_message, read_build_config
from runtime.trt_calls import TensorRTCallError, check
from runtime.trt_environment import probe_environment
from exporters.trt_ops import IncompatibleGraphError


@dataclass
class EngineResult:
    engine_path: Path
    metadata: dict  # engine.json
    seconds: float


@dataclass
class EngineOutcome:
    built: bool
    message: str  # one line for the user
    result: EngineResult | None = None


def build_engine_if_available(bundle: str | Path, **kwargs) -> EngineOutcome:
    """For the build pipeline: build when TensorRT and a GPU are here, else say in one line why not and
    what to run on the target. Build failures other than a missing backend still raise."""
    env = probe_environment()
    if env.reason:
        return EngineOutcome(False, not_built_message(bundle, env.reason))
    result = build_engine(bundle, **kwargs)
    return EngineOutcome(True, f"built {result.engine_path} for {env.gpu} (TensorRT {env.tensorrt}) in "
                               f"{result.seconds:.0f}s", result)


def build_engine(bundle: str | Path, out: str | Path | None = None, workspace_gb: float | None = None,
                 verbose: bool = False) -> EngineResult:
    """Parse the bundle's ONNX (external data beside it), build a strongly typed engine with the
    bundle's profiles, write model.plan + engine.json + the timing cache into `out` (default
    <bundle>/engine). Raises BackendUnavailableError (one line, with the command) without TensorRT/GPU."""
    bundle = Path(bundle).expanduser()
    config = read_build_config(bundle)
    env = probe_environment()
    if env.reason:
        raise BackendUnavailableError(not_built_message(bundle, env.reason))
    import tensorrt as trt

    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailableError(not_built_message(bundle, f"TensorRT {trt.__version__} is too old (the bundle "
                                                                "needs 10.x or 11.x: pip install -U tensorrt)"))
    _check_files(bundle, config)
    out = Path(out) if out is not None else bundle / ENGINE_DIR
    out.mkdir(parents=True, exist_ok=True)
    workspace = int(workspace_gb * 2**30) if workspace_gb else int(config["workspace_bytes"])
    cache_path = out / TIMING_CACHE
    start = time.perf_counter()

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = check(builder.create_network(_network_flags(trt)), "create_network", "the builder could not create a "
                    "network (out of host memory?)")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle / config["onnx"])):  # resolves model.onnx.data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise IncompatibleGraphError(f"TensorRT {trt.__version__} could not parse {bundle / config['onnx']}: {errors}")

    builder_config = check(builder.create_builder_config(), "create_builder_config", "out of host memory?")
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for spec in config["profiles"]:
        profile = builder.create_optimization_profile()
        for name, shapes in spec["shapes"].items():
            if name in network_inputs:  # the parser drops inputs nothing reads
                _set_profile_shape(profile, spec["name"], name, shapes)
        check(builder_config.add_optimization_profile(profile), f"add_optimization_profile({spec['name']!r})",
              f"profile {spec['name']!r} of {bundle / 'trt_build.json'} is invalid (a network input without "
              "shapes, or min/opt/max out of order); rewrite the bundle")
    timing = check(builder_config.create_timing_cache(_reusable_cache(cache_path, out / ENGINE_META, env.key)),
                   f"create_timing_cache({cache_path})", f"{cache_path} is not a TensorRT timing cache; delete it")
    check(builder_config.set_timing_cache(timing, ignore_mismatch=False), f"set_timing_cache({cache_path})",
          f"{cache_path} was written on another GPU or TensorRT version; delete it and build again")

    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise ArtifactError(f"TensorRT {trt.__version__} failed to build {bundle}; rerun with --verbose for the "
                            "builder log (a larger --workspace-gb helps when tactics run out of memory)")
    timings = check(builder_config.get_timing_cache(), "get_timing_cache", "the builder lost its timing cache")
    engine_path = out / ENGINE_FILE
    with atomic_file(engine_path) as tmp:
        tmp.write_bytes(memoryview(serialized))
    with atomic_file(cache_path) as tmp:
        tmp.write_bytes(memoryview(timings.serialize()))

    seconds = time.perf_counter() - start
    metadata = {
        "engine_file": ENGINE_FILE,
        "key": env.key,
        **env.describe(),
        "strongly_typed": True,
        "workspace_bytes": workspace,
        "profiles": [{"index": i, "name": p["name"], "dims": p["dims"], "shapes": p["shapes"]}
                     for i, p in enumerate(config["profiles"])],
        "io": _engine_io(trt, engine_path, logger),
        "timing_cache": cache_path.name,
        "onnx_sha256": config["sha256"],
        "build_seconds": round(seconds, 2),
        "toolchain_version": __version__,
    }
    write_json(out / ENGINE_META, metadata)
    return EngineResult(engine_path, metadata, seconds)


def _check_files(bundle: Path, config: dict) -> None:
    """The graph and weights are the ones the bundle was checked with (a partial copy fails here, not
    halfway through a long build)."""
    for name, digest in config["sha256"].items():
        path = bundle / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: copy the whole bundle directory to the target")
        if sha256_file(path) != digest:
            raise ArtifactError(f"{path} differs from the file the bundle was written and checked with (sha256); "
                                "copy it again or rewrite the bundle")


def _set_profile_shape(profile, profile_name: str, tensor: str, shapes: dict) -> None:
    """The Python binding raises ValueError where the C++ setDimensions returns false."""
    ranges = f"min/opt/max {shapes['min']}/{shapes['opt']}/{shapes['max']} must have the input's rank and min ≤ opt ≤ max"
    try:
        ok = profile.set_shape(tensor, shapes["min"], shapes["opt"], shapes["max"])
    except (ValueError, RuntimeError, TypeError) as err:
        raise TensorRTCallError(f"TensorRT set_shape({tensor!r}) failed in profile {profile_name!r} "
                                f"({first_line(err)}): {ranges}") from None
    if ok is False:
        raise TensorRTCallError(f"TensorRT set_shape({tensor!r}) failed in profile {profile_name!r}: {ranges}")


def _reusable_cache(cache_path: Path, metadata: Path, key: str) -> bytes:
    """The stored timing cache, unless the engine.json beside it says it was made for another GPU or
    TensorRT/CUDA version (then the build starts a fresh one and overwrites it)."""
    if not cache_path.is_file():
        return b""
    if metadata.is_file() and json.loads(metadata.read_text()).get("key") not in (None, key):
        return b""
    return cache_path.read_bytes()


def _network_flags(trt) -> int:
    """STRONGLY_TYPED on 10.x (precision comes from the graph); 11.x is always strongly typed and keeps
    the flag only for compatibility. EXPLICIT_BATCH is the only mode since 10.0, so no flag for it."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _engine_io(trt, engine_path: Path, logger) -> list[dict]:
    """Deserialize the fresh engine (proves it loads) and list its I/O tensors."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise ArtifactError(f"{engine_path} was built but does not deserialize; rebuild it")
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        io.append({"name": name, "mode": mode, "dtype": str(engine.get_tensor_dtype(name)).removeprefix("DataType."),
                   "shape": list(engine.get_tensor_shape(name))})
    return io
