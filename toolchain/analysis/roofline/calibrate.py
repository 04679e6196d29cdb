"""Calibration: compute and bandwidth efficiency fitted from measured prefill/decode times."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

from toolchain.analysis.roofline.configs import model_shape
from toolchain.analysis.roofline.estimate import (
    WEIGHT_BYTES,
    Efficiency,
    count_params,
    normalise_dtype,
    phase_bytes,
    phase_flops,
    sliced_layout,
)
from toolchain.analysis.roofline.gpus import get_gpu
from toolchain.core.errors import ArtifactError

def fit_efficiency(bench: str | os.PathLike | Mapping) -> Efficiency:
    """Fit compute and bandwidth efficiency (ideal time / measured time, i.e. achieved fraction of
    peak) from a bench JSON, so `plan(..., efficiency=...)` predicts ideal / efficiency.

    Bench JSON schema (written by the bench harness; a path or an already-loaded dict)::

        {
          "gpu": "h100-80gb",            # a GPU_SPECS name/alias, torch.cuda.get_device_name() text,
                                         # or a dict {name, memory_bytes, bandwidth, fp16_flops, fp32_flops}
          "dtype": "fp16",               # default for results (fp32|fp16|bf16|int8|int4)
          "n_gpus": 1,                   # optional, default 1 (tensor parallel)
          "results": [
            {"phase": "prefill",         # one forward over `tokens` new tokens per sequence
             "measured_ms": 41.0,        # wall time of the whole measured call (median of repeats)
             "batch": 1,
             "tokens": 2048,             # prefill: prompt tokens; decode: number of decode steps timed
             "context": 0,               # tokens already cached before the first timed step
             "dtype": "fp16",            # optional override
             "model": {...},             # config.json dict (HF or sliced_decoder), a --model name, or
                                         # {"params": N, "weight_bytes": optional,
                                         #  "kv_bytes_per_token": optional (per sequence),
                                         #  "flops_per_token": optional (default 2·params)}
             "slice": 0.3,               # optional: apply SliceGPT (fraction) to an HF config
             "slice_head": false},       # optional
            {"phase": "decode", "measured_ms": 1234.0, "batch": 1, "tokens": 128, "context": 2048,
             "model": {...}}
          ]
        }

    Prefill results fit the compute factor (against FLOPs / peak), decode results the bandwidth factor
    (against bytes / bandwidth); each factor is the geometric mean over its results, 1.0 if none.
    Decode ideal time sums every timed step (cache growing from `context` to `context + tokens − 1`).
    """
    source = None
    if not isinstance(bench, Mapping):
        source = str(bench)
        try:
            bench = json.loads(Path(bench).read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ArtifactError(
                f"bench file {source} does not exist; run `toolchain bench` first or fix the path") from err
        except (ValueError, UnicodeDecodeError, IsADirectoryError) as err:
            raise ArtifactError(f"bench file {source} is not valid JSON ({err}); re-run the benchmark") from err
    if not isinstance(bench, Mapping) or not isinstance(bench.get("results"), list) or "gpu" not in bench:
        raise ArtifactError(f"bench JSON {source or ''} needs a 'gpu' and a 'results' list (see fit_efficiency)")
    if bench["gpu"] is None:
        raise ArtifactError(f"bench JSON {source or ''} was measured without a GPU (provider "
                            f"{bench.get('provider', 'cpu')}); the planner calibrates GPU efficiency, so run "
                            "`toolchain bench BUILD --provider cuda` on the GPU you plan for")
    gpu = get_gpu(bench["gpu"])
    n_gpus = int(bench.get("n_gpus", 1))
    compute, bandwidth = [], []
    for i, result in enumerate(bench["results"]):
        try:
            phase = result["phase"]
            measured = float(result["measured_ms"]) / 1e3
            batch, tokens = int(result.get("batch", 1)), int(result["tokens"])
            context = int(result.get("context", 0))
            dtype = normalise_dtype(result.get("dtype", bench.get("dtype", "fp16")))
            model = result["model"]
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"bench result #{i} lacks or mangles {err}; each needs phase, measured_ms, "
                                "tokens, model (see fit_efficiency)") from err
        if phase not in ("prefill", "decode") or measured <= 0 or tokens < 1:
            raise ArtifactError(f"bench result #{i}: phase must be prefill|decode with measured_ms > 0 and tokens >= 1")
        cost = _result_cost(model, result, dtype, batch, tokens, context, phase)
        if phase == "prefill":
            flops, _ = cost[0]
            compute.append(flops / (n_gpus * gpu.peak_flops(dtype)) / measured)
        else:
            ideal = sum(nbytes for _, nbytes in cost) / (n_gpus * gpu.bandwidth)
            bandwidth.append(ideal / measured)

    def geomean(values):
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 1.0

    return Efficiency(compute=geomean(compute), bandwidth=geomean(bandwidth), gpu=gpu.name,
                      prefill_samples=len(compute), decode_samples=len(bandwidth), source=source)


def _result_cost(model, result, dtype, batch, tokens, context, phase) -> list[tuple[float, float]]:
    """(flops, bytes) per forward: one for prefill, one per decode step."""
    steps = [(tokens, context)] if phase == "prefill" else [(1, context + i) for i in range(tokens)]
    if isinstance(model, Mapping) and "params" in model and "model_type" not in model:
        params = int(model["params"])
        weights = float(model.get("weight_bytes", params * WEIGHT_BYTES[dtype]))
        kv_token = float(model.get("kv_bytes_per_token", 0))
        flops_token = float(model.get("flops_per_token", 2 * params))
        written = tokens if phase == "prefill" else 0
        return [(flops_token * batch * new, weights + kv_token * batch * (past + written)) for new, past in steps]
    shape = model_shape(model)
    fraction = result.get("slice")
    layout = (sliced_layout(shape, float(fraction), bool(result.get("slice_head", False)),
                            tie=result.get("tie", "slice"), share=result.get("share", "none"))
              if fraction is not None and not shape.fused else shape)
    params = count_params(layout)
    return [(phase_flops(layout, params, batch, new, past),
             phase_bytes(layout, params, dtype, batch, new, past, phase)) for new, past in steps]
