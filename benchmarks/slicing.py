"""Wall time and peak RSS of slicing a ~100M-parameter Llama-shaped model at 0.25 on this machine.

    python benchmarks/slicing.py [--nsamples 32] [--seqlen 256]
Writes benchmarks/results/slicing.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import llama_shaped, machine_info, peak_rss_mb, write_results
from toolchain.compress.options import SliceOptions
from toolchain.compress.slicegpt import slice_model
from toolchain.model.modeling import count_parameters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slice", type=float, default=0.25)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    args = parser.parse_args()

    model = llama_shaped()
    dense = count_parameters(model)
    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    rss_before = peak_rss_mb()
    ids = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    slice_model(model, ids, torch.ones_like(ids), SliceOptions(slice=args.slice))
    seconds = time.perf_counter() - start
    sliced = count_parameters(model)
    payload = {
        "benchmark": "slicing", "machine": machine_info(), "model": "llama-shaped 768x12, random weights, fp32",
        "slice": args.slice, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "dense_parameters": dense.total, "sliced_parameters": sliced.total, "shortcut_parameters": sliced.shortcuts,
        "weights_mb_fp32": round(weight_mb, 1), "wall_seconds": round(seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), "peak_rss_mb_before_slicing": round(rss_before, 1),
    }
    markdown = (
        "# Slicing cost\n\n| model | slice | calibration | wall s | peak RSS MB | params dense → sliced |\n|---|---|---|---|---|---|\n"
        f"| {payload['model']} | {args.slice} | {args.nsamples}×{args.seqlen} | {payload['wall_seconds']} | "
        f"{payload['peak_rss_mb']} | {dense.total / 1e6:.1f}M → {sliced.total / 1e6:.1f}M |\n"
    )
    path = write_results("slicing", payload, markdown)
    print(markdown)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
