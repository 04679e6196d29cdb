"""Latency of a ~100M-parameter Llama-shaped model (random weights), dense and sliced, eager torch vs
ONNX Runtime CPU on the exported graph: prefill of 128 tokens and 32 decode steps, batch 1.

    python benchmarks/export_latency.py [--runs 10] [--slice 0.3] [--threads 2]
Writes benchmarks/results/export_latency.{json,md}. Both runtimes go through the same Session
interface (numpy in/out), so the comparison includes the same per-step overhead; the four
configurations are timed round-robin so a busy machine slows them alike.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import llama_shaped, machine_info, peak_rss_mb, write_results
from exporters.onnx import ExportOptions, export_onnx
from runtime.generate import KVStream
from runtime.sessions import OrtSession, Session, TorchSession
from toolchain.compress.options import SliceOptions
from toolchain.compress.slicegpt import slice_model
from toolchain.model.modeling import count_parameters


def time_generation(session: Session, prompt: np.ndarray, decode_steps: int) -> tuple[float, float]:
    """(prefill seconds, mean seconds per decode step) of one greedy run."""
    stream = KVStream.prompt(session, np.ones_like(prompt))
    start = time.perf_counter()
    logits = stream.run(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(decode_steps):
        logits = stream.decode(logits[:, -1:].argmax(-1).astype(np.int64))
    return prefill, (time.perf_counter() - start) / decode_steps


def measure(sessions: dict[str, Session], prompt: np.ndarray, decode_steps: int, runs: int,
            warmup: int = 2) -> dict[str, dict]:
    """Round-robin over the sessions, so load from other processes hits every configuration alike."""
    for session in sessions.values():
        for _ in range(warmup):
            time_generation(session, prompt, decode_steps)
    samples: dict[str, list] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            samples[name].append(time_generation(session, prompt, decode_steps))
    stats = {}
    for name, pairs in samples.items():
        prefill, decode = zip(*pairs)
        stats[name] = {"prefill_ms": 1e3 * statistics.median(prefill),
                       "decode_ms_per_token": 1e3 * statistics.median(decode),
                       "prefill_ms_p90": 1e3 * float(np.percentile(prefill, 90)),
                       "decode_ms_per_token_p90": 1e3 * float(np.percentile(decode, 90)),
                       "decode_tokens_per_s": 1.0 / statistics.median(decode), "runs": runs}
    return stats


def weight_bytes(model) -> dict:
    """fp32 bytes of all weights, and of the ones a decode step reads in full (the embedding is a gather)."""
    report = count_parameters(model)
    return {"all": 4 * report.total, "read_per_token": 4 * (report.total - report.embeddings), "parameters": report.total}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--slice", type=float, default=0.3)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense = llama_shaped()
    sliced = copy.deepcopy(dense)
    calib = torch.randint(0, dense.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    slice_model(sliced, calib, torch.ones_like(calib), SliceOptions(slice=args.slice))
    slice_seconds = time.perf_counter() - start
    prompt = np.random.default_rng(0).integers(3, dense.config.vocab_size, (1, args.prompt), dtype=np.int64)

    results: dict = {}
    sessions: dict[str, Session] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, model in (("dense", dense), ("sliced", sliced)):
            start = time.perf_counter()
            export = export_onnx(model, Path(scratch) / name, ExportOptions(dtype="fp32", optimize=True))
            results[name] = {"weights": weight_bytes(model), "export_seconds": round(time.perf_counter() - start, 1),
                             "onnx_mb": round(sum(p.stat().st_size for p in export.out_dir.glob("model.onnx*")) / 2**20, 1),
                             "fused_norms": export.report["fused_norms"],
                             "residual_widths": model.config.residual_widths[:3]}
            sessions[f"{name}/torch"] = TorchSession(model)
            sessions[f"{name}/ort"] = OrtSession(export.out_dir, "cpu", threads=args.threads)
        for key, stats in measure(sessions, prompt, args.decode, args.runs).items():
            name, runtime = key.split("/")
            results[name][runtime] = stats
            print(key, {k: round(v, 2) for k, v in stats.items()}, flush=True)

    def ratio(a: dict, b: dict) -> dict:
        return {"prefill": a["prefill_ms"] / b["prefill_ms"], "decode": a["decode_ms_per_token"] / b["decode_ms_per_token"]}

    weights = {m: results[m]["weights"] for m in results}
    ratios = {
        "ort_over_torch": {m: ratio(results[m]["ort"], results[m]["torch"]) for m in results},
        "sliced_over_dense": {r: ratio(results["sliced"][r], results["dense"][r]) for r in ("torch", "ort")},
        "ideal_weight_bytes": {k: weights["sliced"][k] / weights["dense"][k] for k in ("all", "read_per_token")},
    }
    payload = {"benchmark": "export_latency", "machine": machine_info(), "load_average": os.getloadavg(),
               "model": "llama-shaped 768x12, 12 heads, inner 2048, vocab 32000, random weights, fp32",
               "slice": args.slice, "slice_seconds": round(slice_seconds, 1), "prompt_tokens": args.prompt,
               "decode_steps": args.decode, "batch": 1, "threads": args.threads, "results": results,
               "ratios": ratios, "peak_rss_mb": round(peak_rss_mb(), 1)}
    markdown = render(payload)
    path = write_results("export_latency", payload, markdown)
    print(markdown)
    print(f"wrote {path}")


def render(p: dict) -> str:
    r, q = p["results"], p["ratios"]
    lines = [
        "# Export latency: eager torch vs ONNX Runtime (CPU), dense vs sliced", "",
        f"{p['model']}; slice {p['slice']}; prompt {p['prompt_tokens']} tokens then {p['decode_steps']} decode steps, "
        f"batch 1, threads={p['threads']}; medians of {r['dense']['torch']['runs']} runs after warm-up. "
        f"Load average during the run: {', '.join(f'{x:.1f}' for x in p['load_average'])}.", "",
        "| model | runtime | prefill ms | decode ms/token | tokens/s | params | ONNX MB |", "|---|---|---|---|---|---|---|",
    ]
    for model in ("dense", "sliced"):
        for runtime in ("torch", "ort"):
            m = r[model][runtime]
            lines.append(f"| {model} | {runtime} | {m['prefill_ms']:.1f} | {m['decode_ms_per_token']:.2f} | "
                         f"{m['decode_tokens_per_s']:.1f} | {r[model]['weights']['parameters'] / 1e6:.1f}M | "
                         f"{r[model]['onnx_mb']} |")
    lines += ["", "| ratio | prefill | decode |", "|---|---|---|"]
    for model, v in q["ort_over_torch"].items():
        lines.append(f"| ORT / torch ({model}) | {v['prefill']:.2f} | {v['decode']:.2f} |")
    for runtime, v in q["sliced_over_dense"].items():
        lines.append(f"| sliced / dense ({runtime}) | {v['prefill']:.2f} | {v['decode']:.2f} |")
    ideal = q["ideal_weight_bytes"]
    lines.append(f"| ideal: weight bytes sliced / dense (read per token; all) | {ideal['read_per_token']:.2f} | "
                 f"{ideal['all']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
