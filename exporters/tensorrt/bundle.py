"""The portable TensorRT bundle: everything the target GPU needs to build and check an engine.

`write_bundle` exports the fp16 graph without ORT fusions (TensorRT cannot parse com.microsoft ops),
folds its constants, checks it statically against TensorRT's parser (exporters/trt_ops.py), and writes
trt_build.json (profiles, precision, workspace, the build and trtexec commands), the parity data and a
README beside it. The format itself (file names, readers) is runtime/trt_bundle.py.
"""

from __future__ import annotations

import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from toolchain import __version__
from toolchain.core.errors import InvalidOptionError
from toolchain.core.fileio import atomic_dir, sha256_file, write_json, write_text
from toolchain.core.iospec import step_shapes
from toolchain.core.tokenizer_files import copy_tokenizer_files

from runtime.trt_bundle import (BUILD_CONFIG, COMPAT_REPORT, ENGINE_DIR, ENGINE_FILE, ENGINE_META, PARITY_DIR, PARITY_SHAPE,
                                TIMING_CACHE, build_command, read_build_config)
from exporters import onnx_graph, trt_ops
from exporters.hf_config import CANONICAL_CONFIG, CONFIG
from exporters.onnx import MODEL_FILE, ExportOptions, export_onnx
from exporters.tensorrt.profiles import covering_profile, default_profiles, profile_shapes
from exporters.tensorrt.readme import bundle_readme
from exporters.trt_ops import IncompatibleGraphError

DEFAULT_MAX_CONTEXT = 4096
DEFAULT_WORKSPACE_GB = 4.0


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
        for name in ("export_config.json", CONFIG, CANONICAL_CONFIG):  # (its export_report.json hashes the pre-fold graph)
            shutil.copyfile(export.out_dir / name, tmp / name)
        shutil.rmtree(export.out_dir)
        copy_tokenizer_files(source_path, tmp)

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
        write_text(tmp / "README.md", bundle_readme(build_config, out, compat))
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


def trtexec_command(build_config: dict) -> str:
    """The equivalent trtexec line, run inside the bundle dir. trtexec takes several optimisation profiles
    only as `--profile=N` directly followed by that profile's --minShapes/--optShapes/--maxShapes (a second
    set without --profile is an error), and --saveEngine does not create its directory."""
    argv = ["trtexec", f"--onnx={build_config['onnx']}", "--stronglyTyped"]
    for index, profile in enumerate(build_config["profiles"]):
        argv.append(f"--profile={index}")
        for key, flag in (("min", "minShapes"), ("opt", "optShapes"), ("max", "maxShapes")):
            spec = ",".join(f"{name}:{'x'.join(map(str, s[key]))}" for name, s in profile["shapes"].items())
            argv.append(f"--{flag}={spec}")
    mib = build_config["workspace_bytes"] // 2**20
    argv += [f"--memPoolSize=workspace:{mib}M", f"--saveEngine={ENGINE_DIR}/{ENGINE_FILE}",
             f"--timingCacheFile={ENGINE_DIR}/{TIMING_CACHE}"]
    return f"mkdir -p {ENGINE_DIR} && {shlex.join(argv)}"


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


def check_bundle(bundle: str | Path) -> trt_ops.CompatReport:
    """Re-run the static TensorRT check on a bundle's graph and profiles."""
    config = read_build_config(bundle)
    return trt_ops.check_graph(Path(bundle) / config["onnx"], config["profiles"])
