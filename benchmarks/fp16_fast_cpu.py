"""The fast ORT graph in fp16 next to fp32 on the CPU: a ~100M-parameter Llama-shaped model (random
weights), dense and sliced, each exported as the fast graph in both dtypes (every export parity-checked
against torch at its dtype's bar), then prefill and decode timed with the four sessions taking turns
(runtime.latency.measure_sessions).

    python benchmarks/fp16_fast_cpu.py [--slice 0.3] [--threads 1] [--steps 20]
Writes benchmarks/results/fp16_fast_cpu.{json,md}. fp16 exists for GPUs; this records what ORT's CPU
kernels make of it, and that the fp16 graph is the fused one.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from common import llama_shaped, write_results
from exporters.onnx import ExportOptions, export_onnx
from runtime.latency import BenchConfig, Measured, load_average, load_drift, machine_info, measure_sessions
from runtime.sessions import OrtSession
from toolchain.compress.options import SliceOptions
from toolchain.compress.slicegpt import slice_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slice", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loads = [load_average()]

    dense = llama_shaped()
    sliced = copy.deepcopy(dense)
    calib = torch.randint(0, dense.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    slice_model(sliced, calib, torch.ones_like(calib), SliceOptions(slice=args.slice))

    exports, entries = {}, []
    config = BenchConfig(prompts=(args.prompt,), batches=(1,), steps=args.steps, warmup=3, repeats=args.repeats,
                         context=args.context, threads=args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        for name, model in (("dense", dense), ("sliced", sliced)):
            for dtype in ("fp32", "fp16"):
                start = time.perf_counter()
                result = export_onnx(model, Path(scratch) / f"{name}-{dtype}", ExportOptions(dtype=dtype))
                graph = result.report["graph"]
                exports[f"{name}-{dtype}"] = {"graph": graph["kind"], "fallback_reason": graph["fallback_reason"],
                                              "parity": graph["parity"]["summary"] if graph["parity"] else None,
                                              "export_s": round(time.perf_counter() - start, 1),
                                              "onnx_mb": round(sum(p.stat().st_size for p in
                                                                   result.out_dir.glob("model.onnx*")) / 2**20, 1)}
                print(name, dtype, exports[f"{name}-{dtype}"], flush=True)
                session = OrtSession(result.out_dir, "cpu", threads=args.threads, name=f"ort-cpu-{dtype}")
                entries.append(Measured(f"{name}-{dtype}", session, dtype))
        loads.append(load_average())
        results = measure_sessions(entries, config, dense.config.max_position_embeddings)
    loads.append(load_average())
    rows = {r["variant"] + "/" + r["phase"]: r for r in results}
    ratios = {f"{name} {phase}": rows[f"{name}-fp16/{phase}"]["p50_ms"] / rows[f"{name}-fp32/{phase}"]["p50_ms"]
              for name in ("dense", "sliced") for phase in ("prefill", "decode")}
    machine = machine_info()
    payload = {"benchmark": "fp16_fast_cpu", "machine": machine, "load_samples": loads,
               "load_warning": load_drift(loads, machine["cpu_count"]),
               "model": "llama-shaped 768x12, 12 heads, inner 2048, vocab 32000, random weights",
               "slice": args.slice, "threads": args.threads, "config": config.__dict__, "exports": exports,
               "results": results, "fp16_over_fp32_p50": ratios}
    markdown = render(payload)
    path = write_results("fp16_fast_cpu", payload, markdown)
    print(markdown)
    print(f"wrote {path}")


def render(p: dict) -> str:
    c = p["config"]
    lines = ["# The fast ORT graph, fp16 vs fp32, on the CPU", "",
             f"{p['model']}; slice {p['slice']}; ORT CPU, {p['threads']} thread(s), {p['machine']['cpu']}. Prefill "
             f"{c['prompts'][0]} tokens (median of {c['repeats']}), decode batch 1 from a {c['context']}-token cache "
             f"({c['steps']} timed steps after {c['warmup']}); the four sessions took turns call by call. 1-minute "
             f"load average: {', '.join(f'{s[0]:.2f}' for s in p['load_samples'] if s)}."
             + (f" **Warning: {p['load_warning']}.**" if p["load_warning"] else ""), "",
             "| export | graph | parity vs torch | ONNX MB |", "|---|---|---|---:|"]
    for name, e in p["exports"].items():
        s = e["parity"] or {}
        parity = (f"max abs {s['logits_max_abs']:.2g}, top-1 {s['top1']:.3f}"
                  + (f", cosine {s['cosine']:.6f}" if "cosine" in s else "")) if s else "-"
        lines.append(f"| {name} | {e['graph']}{' (' + e['fallback_reason'] + ')' if e['fallback_reason'] else ''} "
                     f"| {parity} | {e['onnx_mb']} |")
    lines += ["", "| variant | phase | p50 ms | p90 ms | tokens/s |", "|---|---|---:|---:|---:|"]
    for r in p["results"]:
        lines.append(f"| {r['variant']} | {r['phase']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['tokens_per_s']:.1f} |")
    lines += ["", "fp16 / fp32 (p50): " + ", ".join(f"{k} {v:.2f}x" for k, v in p["fp16_over_fp32_p50"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
