"""Perplexity vs total parameters on the real test model (SmolLM2-135M, PTB), per slicing recipe.

    python benchmarks/smollm2_quality.py [--nsamples 32] [--seqlen 256] [--eval-windows 16] [--only NAME ...]
Writes benchmarks/results/smollm2_quality.{json,md,png}. Calibration: PTB train; evaluation: PTB test
(the protocol is recorded in the JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from common import RESULTS, machine_info, write_results
from toolchain.adapters import to_canonical
from toolchain.compress.slicegpt import SliceOptions, slice_model
from toolchain.data import eval_windows, load_text, token_windows
from toolchain.evaluate import perplexity
from toolchain.model import count_parameters
from toolchain.sources import load_hf_model, resolve_model

# name -> (keep_tie, SliceOptions kwargs); "dense" is the unsliced canonical model
RECIPES = {
    "dense": (True, None),
    "reference 0.10": (False, dict(slice=0.10)),
    "reference 0.20": (False, dict(slice=0.20)),
    "reference 0.25": (False, dict(slice=0.25)),
    "reference 0.30": (False, dict(slice=0.30)),
    "identity-rotation 0.25": (False, dict(slice=0.25, rotation="identity")),
    "random-rotation 0.25": (False, dict(slice=0.25, rotation="random")),
    "tied 0.10": (True, dict(slice=0.10)),
    "tied 0.20": (True, dict(slice=0.20)),
    "tied 0.25": (True, dict(slice=0.25)),
    "tied 0.30": (True, dict(slice=0.30)),
    "tied-project 0.25": (True, dict(slice=0.25, tie="project")),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()

    hf, tokenizer = load_hf_model(resolve_model("smollm2-135m"))
    source_params = count_parameters(hf).total
    canonical = {keep: to_canonical(hf, source_model="smollm2-135m", keep_tie=keep) for keep in (True, False)}
    calib = token_windows(tokenizer, load_text("ptb", "train"), args.nsamples, args.seqlen, seed=0)
    test = eval_windows(tokenizer, load_text("ptb", "test"), args.eval_seqlen, max_windows=args.eval_windows)
    previous = RESULTS / "smollm2_quality.json"
    rows = {r["name"]: r for r in json.loads(previous.read_text())["rows"]} if previous.exists() else {}
    for name, (keep_tie, kwargs) in RECIPES.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        model = copy.deepcopy(canonical[keep_tie])
        if kwargs is not None:
            slice_model(model, calib.input_ids, calib.attention_mask, SliceOptions(**kwargs))
        params = count_parameters(model)
        result = perplexity(model, tokenizer, test, seqlen=args.eval_seqlen)
        rows[name] = {"name": name, "ppl": round(result["ppl"], 3), "parameters": params.total,
                      "shortcuts": params.shortcuts, "kept_vs_source": round(params.total / source_params, 4),
                      "options": kwargs, "keep_tie": keep_tie, "seconds": round(time.perf_counter() - start, 1)}
        print(rows[name], flush=True)
    payload = {"benchmark": "smollm2_quality", "machine": machine_info(), "source_parameters": source_params,
               "calibration": calib.protocol | {"text": "ptb train"}, "evaluation": test.protocol | {"text": "ptb test"},
               "rows": sorted(rows.values(), key=lambda r: -r["parameters"])}
    lines = ["| recipe | total params | vs dense | shortcuts | PTB ppl |", "|---|---|---|---|---|"]
    for row in payload["rows"]:
        lines.append(f"| {row['name']} | {row['parameters'] / 1e6:.2f}M | {row['kept_vs_source']:.1%} | "
                     f"{row['shortcuts'] / 1e6:.2f}M | {row['ppl']:.2f} |")
    write_results("smollm2_quality", payload, "\n".join(lines) + "\n")
    plot(payload)
    print("\n".join(lines))


def plot(payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list] = {}
    for row in payload["rows"]:
        family = row["name"].rsplit(" ", 1)[0] if row["name"] != "dense" else "dense"
        families.setdefault(family, []).append(row)
    for family, rows in families.items():
        rows.sort(key=lambda r: r["parameters"])
        ax.plot([r["parameters"] / 1e6 for r in rows], [r["ppl"] for r in rows], "o-", label=family)
    ax.axvline(payload["source_parameters"] / 1e6, color="grey", linestyle=":", label="dense size")
    ax.set_xlabel("total parameters (M, shortcuts and embeddings included)")
    ax.set_ylabel("PTB test perplexity")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: perplexity vs size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "smollm2_quality.png", dpi=120)


if __name__ == "__main__":
    main()
