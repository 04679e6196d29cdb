"""TensorRT target: a portable bundle written anywhere, turned into an engine on the target GPU.

Engines only run on the GPU architecture and TensorRT version that built them, so `write_bundle`
produces everything the target needs, checked here:

  model.onnx + model.onnx.data   fp16 graph without ORT fusions (TensorRT cannot parse com.microsoft
                                 ops), constant-folded; norms, RoPE angles, softmax, logits stay fp32
  trt_build.json                 two optimisation profiles (prefill, decode), min/opt/max per input,
                                 precision, workspace, the build commands
  compat_report.json             static parser check (exporters/trt_ops.py)
  parity/                        inputs and torch-fp32 expected logits for `validate` on the target
  config.json, tokenizer files, export_config.json, README.md

`build_engine` (or `python -m exporters.tensorrt build <bundle>`) then parses the ONNX with
TensorRT's parser into a strongly typed network and writes engine/model.plan + engine/engine.json,
with a timing cache beside them keyed by GPU, compute capability, TensorRT and CUDA versions.
`tensorrt` is imported only there; without it the build says in one line why and what to run.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import typer

from toolchain import __version__
from toolchain.core.errors import ArtifactError, BackendUnavailableError, InvalidOptionError, ToolchainError
from toolchain.core.fileio import atomic_dir, atomic_file, sha256_file, write_json, write_text

from exporters import onnx_graph, trt_ops
from exporters.kv_wrapper import BATCH, PAST, SEQ, TOTAL
from exporters.onnx import MODEL_FILE, TOKENIZER_FILES, ExportOptions, export_onnx

BUILD_CONFIG = "trt_build.json"
COMPAT_REPORT = "compat_report.json"
ENGINE_DIR, ENGINE_FILE, ENGINE_META = "engine", "model.plan", "engine.json"
PARITY_DIR = "parity"
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_WORKSPACE_GB = 4.0
# The parity harness's default shapes (runtime/parity.make_inputs): batch 2, prompt 12, 3 decode steps.
PARITY_SHAPE = {"batch": 2, "prompt": 12, "pad": 3, "decode_steps": 3}
BUILD_COMMAND = "python -m exporters.tensorrt build"


class IncompatibleGraphError(ArtifactError):
    """The bundle's graph would not parse or build with TensorRT."""


# --- profiles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileRange:
    """(min, opt, max) per named dim for one optimisation profile."""

    name: str
    batch: tuple[int, int, int]
    sequence: tuple[int, int, int]
    past: tuple[int, int, int]

    @property
    def dims(self) -> dict[str, tuple[int, int, int]]:
        total = tuple(s + p for s, p in zip(self.sequence, self.past))
        return {BATCH: self.batch, SEQ: self.sequence, PAST: self.past, TOTAL: total}


def default_profiles(max_batch: int, max_prompt: int, max_context: int, opt_batch: int = 1) -> list[ProfileRange]:
    """prefill: any prompt up to max_prompt with an empty cache; decode: one token on 1..max_context-1
    cached ones. Profile 0 is prefill, 1 is decode (the session picks by phase)."""
    batch = (1, min(opt_batch, max_batch), max_batch)
    prefill = ProfileRange("prefill", batch, (1, max(1, max_prompt // 2), max_prompt), (0, 0, 0))
    decode = ProfileRange("decode", batch, (1, 1, 1), (1, max(1, max_context // 2), max_context - 1))
    return [prefill, decode]


def profile_shapes(profile: ProfileRange, inputs: list[dict]) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes for every graph input (`inputs`: export_config.json's I/O spec)."""
    dims, shapes = profile.dims, {}
    for spec in inputs:
        per_axis = [dims[d] if isinstance(d, str) else (d, d, d) for d in spec["shape"]]
        shapes[spec["name"]] = {key: [axis[i] for axis in per_axis] for i, key in enumerate(("min", "opt", "max"))}
    return shapes


def covering_profile(profiles: list[dict], shapes: dict[str, tuple], prefer: str | None = None) -> dict | None:
    """The profile (trt_build.json entry) whose ranges hold every shape in `shapes`; `prefer` first."""
    ordered = sorted(profiles, key=lambda p: p["name"] != prefer)
    for profile in ordered:
        spec = profile["shapes"]
        if all(name in spec and len(shape) == len(spec[name]["min"]) and
               all(lo <= s <= hi for s, lo, hi in zip(shape, spec[name]["min"], spec[name]["max"]))
               for name, shape in shapes.items()):
            return profile
    return None


def step_shapes(batch: int, new: int, past: int, kv: dict) -> dict[str, tuple]:
    """Input shapes of one model call with `new` tokens on `past` cached ones."""
    shapes = {"input_ids": (batch, new), "attention_mask": (batch, past + new), "position_ids": (batch, new)}
    for i, (key_dim, value_dim) in enumerate(zip(kv["key_head_dims"], kv["value_head_dims"])):
        shapes[f"past_key_values.{i}.key"] = (batch, kv["heads"], past, key_dim)
        shapes[f"past_key_values.{i}.value"] = (batch, kv["heads"], past, value_dim)
    return shapes


# --- the bundle ----------------------------------------------------------------------------------


@dataclass
class BundleResult:
    out_dir: Path
    model_path: Path
    build_config: dict  # trt_build.json
    compat: trt_ops.CompatReport
    sizes: dict[str, int]  # bytes per file
    seconds: float


def write_bundle(sliced_model_dir: str | Path, out_dir: str | Path, max_batch: int = 8,
                 max_prompt: int | None = None, max_context: int | None = None, overwrite: bool = False,
                 workspace_gb: float = DEFAULT_WORKSPACE_GB, traced: str | Path | None = None) -> BundleResult:
    """Write the TensorRT bundle of the saved (sliced) model at `sliced_model_dir` into `out_dir`.

    max_context defaults to min(max_position_embeddings, 4096), max_prompt to half of it. `traced`: a raw
    graph `exporters.trace_onnx` already wrote for this model (skips the torch export). Raises
    IncompatibleGraphError when the static TensorRT check fails; nothing is left behind then.
    """
    from runtime.loading import load_causal_lm, to_canonical_model

    start = time.perf_counter()
    source = Path(sliced_model_dir).expanduser()
    model, source_path = load_causal_lm(source)
    model = to_canonical_model(model, str(source))
    config = model.config
    max_context, max_prompt = _check_limits(config, max_batch, max_prompt, max_context, workspace_gb)
    out = Path(out_dir)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        export = export_onnx(model, tmp / ".export", ExportOptions(dtype="fp16", optimize=False, external_data=True),
                             traced=traced)
        folding = fold_constants(export.model_path, tmp / MODEL_FILE)
        onnx_graph.check(tmp / MODEL_FILE)  # full onnx check; writes inferred types for the parser check
        for name in ("export_config.json", "config.json"):  # (its export_report.json hashes the pre-fold graph)
            shutil.copyfile(export.out_dir / name, tmp / name)
        shutil.rmtree(export.out_dir)
        _copy_tokenizer(source_path, tmp)

        export_config = export.config
        kv = {"layers": export_config["num_layers"], "heads": export_config["num_key_value_heads"],
              "key_head_dims": export_config["key_head_dims"], "value_head_dims": export_config["value_head_dims"]}
        profiles = default_profiles(max_batch, max_prompt, max_context)
        build_config = _build_config(export_config, profiles, kv, folding, max_batch, max_prompt, max_context,
                                     config.max_position_embeddings, workspace_gb, out, tmp)
        compat = trt_ops.check_graph(tmp / MODEL_FILE, build_config["profiles"])
        if not compat.passed:
            raise IncompatibleGraphError(f"{out}: {compat.summary()}")
        build_config["compatibility"] = {"passed": True, "target": f"TensorRT {trt_ops.TARGET}",
                                         "summary": compat.summary()}
        write_json(tmp / BUILD_CONFIG, build_config)
        write_json(tmp / COMPAT_REPORT, compat.to_dict())
        _write_parity_data(model, tmp / PARITY_DIR, build_config, kv)
        write_text(tmp / "README.md", _readme(build_config, out, compat))
        sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    return BundleResult(out, out / MODEL_FILE, build_config, compat, sizes, time.perf_counter() - start)


def _check_limits(config, max_batch, max_prompt, max_context, workspace_gb) -> tuple[int, int]:
    positions = int(config.max_position_embeddings)
    max_context = min(positions, DEFAULT_MAX_CONTEXT) if max_context is None else int(max_context)
    max_prompt = max(1, max_context // 2) if max_prompt is None else int(max_prompt)
    if max_batch < 1:
        raise InvalidOptionError(f"max_batch must be ≥ 1, got {max_batch}")
    if max_context < 2 or max_context > positions:
        raise InvalidOptionError(f"max_context {max_context} must be in 2..{positions} (the model's "
                                 "max_position_embeddings); lower it")
    if not 1 <= max_prompt <= max_context:
        raise InvalidOptionError(f"max_prompt {max_prompt} must be in 1..max_context ({max_context})")
    if workspace_gb <= 0:
        raise InvalidOptionError(f"workspace_gb must be > 0, got {workspace_gb}")
    return max_context, max_prompt


def fold_constants(src: Path, dst: Path) -> dict:
    """Constant folding (incl. shape arithmetic on static dims) and dead-node removal with onnxscript's
    optimizer passes: standard ops in, standard ops out, so the parser sees no foldable subgraphs.
    (Polygraphy's `surgeon sanitize --fold-constants` does the same job; this needs no extra package.)
    Weights go to `dst`.data."""
    import onnx_ir as ir
    import onnxscript
    from onnxscript import optimizer

    model = ir.load(src)
    before = len(onnx.load(str(src), load_external_data=False).graph.node)
    optimizer.fold_constants(model)
    optimizer.remove_unused_nodes(model)
    ir.save(model, dst, external_data=dst.name + onnx_graph.DATA_SUFFIX)
    after = len(onnx.load(str(dst), load_external_data=False).graph.node)
    return {"tool": f"onnxscript.optimizer.fold_constants {onnxscript.__version__}", "nodes_before": before,
            "nodes_after": after}


def _copy_tokenizer(source: Path | None, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if source is not None and (source / name).is_file():
            shutil.copyfile(source / name, out / name)


def _build_config(export_config, profiles, kv, folding, max_batch, max_prompt, max_context, positions,
                  workspace_gb, out: Path, folder: Path) -> dict:
    inputs = export_config["inputs"]
    workspace = int(workspace_gb * 2**30)
    entries = [{"name": p.name, "dims": {k: list(v) for k, v in p.dims.items()}, "shapes": profile_shapes(p, inputs)}
               for p in profiles]
    config = {
        "format": "toolchain.trt-bundle/1",
        "onnx": MODEL_FILE,
        "external_data": MODEL_FILE + onnx_graph.DATA_SUFFIX,
        "sha256": {name: sha256_file(folder / name) for name in (MODEL_FILE, MODEL_FILE + onnx_graph.DATA_SUFFIX)},
        "parser_ops": f"TensorRT {trt_ops.TARGET} ({trt_ops.SOURCE})",
        "api": "TensorRT Python API 10.x / 11.x",
        "strongly_typed": True,
        "dtype": "fp16",
        "precision": "fp16 weights, activations and KV cache; norms, RoPE angles, softmax and logits fp32 (the "
                     "network is strongly typed: TensorRT keeps the graph's types)",
        "io": {**{i["name"]: i["dtype"] for i in inputs}, **{o["name"]: o["dtype"] for o in export_config["outputs"]}},
        "workspace_bytes": workspace,
        "limits": {"max_batch": max_batch, "max_prompt": max_prompt, "max_context": max_context,
                   "max_position_embeddings": positions},
        "profiles": entries,
        "kv_cache": kv,
        "graph": folding,
        "engine": {"dir": ENGINE_DIR, "file": ENGINE_FILE, "metadata": ENGINE_META},
        "source_model": export_config.get("source_model"),
        "toolchain_version": __version__,
    }
    config["commands"] = {"build": build_command(out), "trtexec": trtexec_command(config)}
    return config


def build_command(bundle: str | Path) -> str:
    return f"{BUILD_COMMAND} {shlex.quote(str(bundle))}"


def trtexec_command(build_config: dict) -> str:
    """The equivalent trtexec line, run inside the bundle dir; one --min/--opt/--maxShapes set per profile."""
    parts = [f"trtexec --onnx={build_config['onnx']} --stronglyTyped"]
    for profile in build_config["profiles"]:
        for key, flag in (("min", "minShapes"), ("opt", "optShapes"), ("max", "maxShapes")):
            spec = ",".join(f"{name}:{'x'.join(map(str, s[key]))}" for name, s in profile["shapes"].items())
            parts.append(f"--{flag}={spec}")
    mib = build_config["workspace_bytes"] // 2**20
    parts += [f"--memPoolSize=workspace:{mib}M", f"--saveEngine={ENGINE_DIR}/{ENGINE_FILE}",
              f"--timingCacheFile={ENGINE_DIR}/timing.cache"]
    return " ".join(parts)


def _write_parity_data(model, out: Path, build_config: dict, kv: dict) -> None:
    """Inputs and torch fp32 expected logits of the parity harness (left-padded batch, prefill + decode),
    sized to fit the profiles; `validate_bundle` replays them through the engine."""
    from runtime.parity import TOLERANCES, make_inputs, run_steps
    from runtime.sessions import TorchSession

    limits = build_config["limits"]
    batch = min(PARITY_SHAPE["batch"], limits["max_batch"])
    prompt = min(PARITY_SHAPE["prompt"], limits["max_prompt"])
    steps = min(PARITY_SHAPE["decode_steps"], limits["max_context"] - prompt)
    inputs = make_inputs(model.config.vocab_size, batch=batch, prompt=prompt, pad=min(PARITY_SHAPE["pad"], prompt - 1),
                         decode_steps=steps, seed=0)
    result = run_steps(TorchSession(model, name="torch-fp32"), inputs)
    out.mkdir()
    np.savez(out / "inputs.npz", input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
             decode_ids=inputs.decode_ids)
    np.savez(out / "expected.npz", **{step.name: step.logits.astype(np.float32) for step in result.steps})
    plan = []
    for t, step in enumerate(result.steps):
        new, past = (prompt, 0) if t == 0 else (1, prompt + t - 1)
        phase = "prefill" if t == 0 else "decode"
        profile = covering_profile(build_config["profiles"], step_shapes(batch, new, past, kv), prefer=phase)
        plan.append({"step": step.name, "new_tokens": new, "past": past, "profile": profile and profile["name"]})
    write_json(out / "parity.json", {"reference": "torch fp32 (the sliced model)", "dtype": "fp16",
                                     "tolerances": asdict(TOLERANCES["fp16"]), "inputs": inputs.describe(),
                                     "steps": plan, "files": ["inputs.npz", "expected.npz"]})


def load_parity_data(bundle: str | Path):
    """(ParityInputs, {step name: expected fp32 logits}) stored in a bundle."""
    from runtime.parity import ParityInputs

    folder = Path(bundle) / PARITY_DIR
    if not (folder / "inputs.npz").is_file() or not (folder / "expected.npz").is_file():
        raise ArtifactError(f"{folder} has no inputs.npz/expected.npz; rewrite the bundle with write_bundle")
    with np.load(folder / "inputs.npz") as data:
        inputs = ParityInputs(data["input_ids"], data["attention_mask"], data["decode_ids"], seed=0)
    with np.load(folder / "expected.npz") as data:
        expected = {name: data[name] for name in data.files}
    return inputs, expected


def read_build_config(bundle: str | Path) -> dict:
    path = Path(bundle).expanduser() / BUILD_CONFIG
    if not path.is_file():
        raise ArtifactError(f"{path.parent} is not a TensorRT bundle (no {BUILD_CONFIG}); write one with "
                            "`toolchain build --target trt` or exporters.tensorrt.write_bundle")
    return json.loads(path.read_text())


def check_bundle(bundle: str | Path) -> trt_ops.CompatReport:
    """Re-run the static TensorRT check on a bundle's graph and profiles."""
    config = read_build_config(bundle)
    return trt_ops.check_graph(Path(bundle) / config["onnx"], config["profiles"])


def _readme(config: dict, out: Path, compat: trt_ops.CompatReport) -> str:
    limits, kv = config["limits"], config["kv_cache"]
    rows = []
    for profile in config["profiles"]:
        d = profile["dims"]
        rows.append(f"| {profile['name']} | {d[BATCH]} | {d[SEQ]} | {d[PAST]} | {d[TOTAL]} |")
    return "\n".join([
        f"# TensorRT bundle: {config.get('source_model') or 'model'}",
        "",
        "Everything needed to build and check a TensorRT engine on the target GPU. Engines only run on the GPU",
        "architecture and TensorRT version that built them, so the engine is built there, not shipped.",
        "",
        "## Build the engine (on the target GPU, TensorRT 10.x or 11.x)",
        "",
        "```",
        "pip install -e . tensorrt   # this toolchain and TensorRT (10.x or 11.x)",
        config["commands"]["build"] + "   # the bundle's path on the target",
        "```",
        "",
        f"writes `{ENGINE_DIR}/{ENGINE_FILE}` and `{ENGINE_DIR}/{ENGINE_META}` (profiles, versions, I/O), with a",
        "timing cache beside them keyed by GPU, compute capability, TensorRT and CUDA versions. The same build with",
        "trtexec, from inside this directory (each --minShapes/--optShapes/--maxShapes set is one profile: prefill,",
        "then decode):",
        "",
        "```",
        config["commands"]["trtexec"],
        "```",
        "",
        "## Check it",
        "",
        "```",
        f"python -m exporters.tensorrt validate {shlex.quote(str(out))}   # engine vs stored torch outputs",
        f"python -m exporters.tensorrt check {shlex.quote(str(out))}      # static parser check, runs anywhere",
        "```",
        "",
        f"`{PARITY_DIR}/` holds the inputs (batch {PARITY_SHAPE['batch']}, left padded, prefill + decode steps) and",
        "the torch fp32 logits they must reproduce at fp16 tolerances: top-1 agreement ≥ 0.99, cosine ≥ 0.995.",
        "",
        "## Contents",
        "",
        f"- `{config['onnx']}` + `{config['external_data']}`: the graph, {config['precision']}.",
        f"  Standard ONNX ops only (no ORT fusions), constant-folded ({config['graph']['tool']}).",
        f"- `{BUILD_CONFIG}`: optimisation profiles (min/opt/max per input), dtype, workspace "
        f"({config['workspace_bytes'] // 2**20} MiB).",
        f"- `{COMPAT_REPORT}`: {compat.summary()}.",
        "- `config.json`, tokenizer files, `export_config.json` (I/O names and dims).",
        "",
        "## Profiles (min, opt, max)",
        "",
        f"| profile | {BATCH} | {SEQ} | {PAST} | {TOTAL} |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"KV cache: {kv['layers']} layers, {kv['heads']} KV heads, key head dims {kv['key_head_dims']}, value head "
        f"dims {kv['value_head_dims']} (per layer, fp16). Limits: batch ≤ {limits['max_batch']}, prompt ≤ "
        f"{limits['max_prompt']}, context ≤ {limits['max_context']} tokens.",
        "",
        "## onnxruntime-gpu instead",
        "",
        "ONNX Runtime's TensorRT execution provider can run `model.onnx` directly and cache the engines it builds:",
        "`runtime.trt_session.tensorrt_provider_options(cache_dir, bundle)` gives the provider options.",
        "",
    ])


# --- building the engine -------------------------------------------------------------------------


@dataclass
class TrtEnvironment:
    """What this machine offers for building/running engines; `reason` is None when it can."""

    tensorrt: str | None = None
    cuda: str | None = None
    gpu: str | None = None
    capability: str | None = None
    reason: str | None = None

    @property
    def key(self) -> str:
        """Timing caches and engines are only valid for this combination."""
        raw = f"{self.gpu}-sm{(self.capability or '').replace('.', '')}-trt{self.tensorrt}-cuda{self.cuda}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)

    def describe(self) -> dict:
        return {"gpu": self.gpu, "compute_capability": self.capability, "tensorrt": self.tensorrt, "cuda": self.cuda}


def probe_environment() -> TrtEnvironment:
    env, reasons = TrtEnvironment(), []
    try:
        import tensorrt as trt

        env.tensorrt = trt.__version__
    except Exception as err:  # noqa: BLE001  (ImportError, or a broken install raising OSError)
        reasons.append(f"tensorrt is not importable ({_first_line(err)})")
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            env.gpu, env.capability, env.cuda = torch.cuda.get_device_name(), f"{major}.{minor}", torch.version.cuda
        else:
            reasons.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    except Exception as err:  # noqa: BLE001
        reasons.append(f"CUDA could not be queried ({_first_line(err)})")
    env.reason = " and ".join(reasons) or None
    return env


def trt_available() -> bool:
    """True where an engine can be built and run here: tensorrt imports and a CUDA GPU is visible."""
    return probe_environment().reason is None


def not_built_message(bundle: str | Path, reason: str) -> str:
    return f"TensorRT engine not built: {reason}; on the target GPU run: {build_command(bundle)}"


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


# --- CLI: python -m exporters.tensorrt {build,check,validate}; mountable as `toolchain trt` ----------

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="TensorRT bundles: build the engine on the target GPU, check and validate a bundle.")


@contextlib.contextmanager
def _one_line_errors():
    try:
        yield
    except ToolchainError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None


@cli.command("build")
def build_cli(bundle: Path = typer.Argument(..., help="A bundle dir written by write_bundle / --target trt."),
              out: Optional[Path] = typer.Option(None, "--out", help="Engine dir (default: <bundle>/engine)."),
              workspace_gb: Optional[float] = typer.Option(None, "--workspace-gb", help="Builder workspace limit."),
              verbose: bool = typer.Option(False, "--verbose", help="TensorRT's verbose builder log.")) -> None:
    """Build the engine from a bundle (needs TensorRT and a CUDA GPU; exits 2 with the reason otherwise)."""
    with _one_line_errors():
        result = build_engine(bundle, out, workspace_gb, verbose)
    typer.echo(f"built {result.engine_path} ({result.engine_path.stat().st_size / 2**20:.1f} MiB) in "
               f"{result.seconds:.0f}s for {result.metadata['gpu']} (TensorRT {result.metadata['tensorrt']})")


@cli.command("check")
def check_cli(bundle: Path = typer.Argument(..., help="A bundle dir.")) -> None:
    """Static check: every op/type in TensorRT's parser list, profiles cover every dynamic dim."""
    with _one_line_errors():
        report = check_bundle(bundle)
    typer.echo(report.summary())
    for problem in report.problems:
        typer.echo(f"  {problem.kind}: {problem.message}")
    if not report.passed:
        raise typer.Exit(1)


@cli.command("validate")
def validate_cli(bundle: Path = typer.Argument(..., help="A bundle dir (with engine/ for --backend tensorrt)."),
                 backend: str = typer.Option("tensorrt", "--backend", help="tensorrt | onnxruntime (the bundle's "
                                                                             "fp16 ONNX on ORT)."),
                 provider: str = typer.Option("cpu", "--provider", help="ORT provider for --backend onnxruntime."),
                 report: Optional[Path] = typer.Option(None, "--report", help="Dir for parity.json/.md.")) -> None:
    """Replay the bundle's parity inputs and compare with the stored torch outputs; exit 1 on failure."""
    from runtime.trt_session import validate_bundle

    with _one_line_errors():
        result = validate_bundle(bundle, backend=backend, provider=provider, report_dir=report)
    logits = result["summary"]["logits"]
    typer.echo(f"{'PASS' if result['passed'] else 'FAIL'} {result['candidate']} vs stored torch fp32: top-1 "
               f"{logits['top1']:.3f}, cosine {logits['cosine']:.5f}, max abs {logits['max_abs']:.3g}")
    if not result["passed"]:
        raise typer.Exit(1)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


if __name__ == "__main__":  # python -m exporters.tensorrt ...
    cli(prog_name="python -m exporters.tensorrt")
