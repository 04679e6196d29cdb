"""README.md of a TensorRT bundle: how to build, check and use it on the target GPU."""

from __future__ import annotations

import shlex
from pathlib import Path

from toolchain.core.iospec import BATCH, PAST, SEQ, TOTAL

from runtime.trt_bundle import (BUILD_CONFIG, COMPAT_REPORT, ENGINE_DIR, ENGINE_FILE, ENGINE_META, PARITY_DIR, PARITY_SHAPE,
                                TIMING_CACHE)
from exporters import trt_ops


def bundle_readme(config: dict, out: Path, compat: trt_ops.CompatReport) -> str:
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
        f"writes `{ENGINE_DIR}/{ENGINE_FILE}` and `{ENGINE_DIR}/{ENGINE_META}` (profiles, versions, I/O), with the",
        f"timing cache `{ENGINE_DIR}/{TIMING_CACHE}` beside them (TensorRT reuses it only on the same GPU and",
        "TensorRT version). The same build with trtexec, from inside this directory: "
        + ", ".join(f"`--profile={i}` ({p['name']})" for i, p in enumerate(config["profiles"])) + ",",
        "each directly followed by that profile's --minShapes/--optShapes/--maxShapes, sharing the timing cache",
        "with the command above:",
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
