"""Building the engine on the target GPU: parse the bundle's ONNX with TensorRT's parser into a strongly
typed network, build it with the bundle's profiles, and write engine/model.plan + engine/engine.json with a
timing cache beside them keyed by GPU, compute capability, TensorRT and CUDA versions. `tensorrt` is
imported only inside the build; without it the build says in one line why and what to run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from toolchain import __version__
from toolchain.core.errors import ArtifactError, BackendUnavailableError
from toolchain.core.fileio import atomic_file, sha256_file, write_json

from runtime.trt_bundle import ENGINE_DIR, ENGINE_FILE, ENGINE_META, not_built_message, read_build_config
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
    cache_path = out / f"timing-{env.key}.cache"
    start = time.perf_counter()

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle / config["onnx"])):  # resolves model.onnx.data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise IncompatibleGraphError(f"TensorRT {trt.__version__} could not parse {bundle / config['onnx']}: {errors}")

    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for spec in config["profiles"]:
        profile = builder.create_optimization_profile()
        for name, shapes in spec["shapes"].items():
            if name in network_inputs:  # the parser drops inputs nothing reads
                profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        builder_config.add_optimization_profile(profile)
    timing = builder_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    builder_config.set_timing_cache(timing, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise ArtifactError(f"TensorRT {trt.__version__} failed to build {bundle}; rerun with --verbose for the "
                            "builder log (a larger --workspace-gb helps when tactics run out of memory)")
    engine_path = out / ENGINE_FILE
    with atomic_file(engine_path) as tmp:
        tmp.write_bytes(memoryview(serialized))
    with atomic_file(cache_path) as tmp:
        tmp.write_bytes(memoryview(builder_config.get_timing_cache().serialize()))

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
