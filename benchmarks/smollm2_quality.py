"""Perplexity vs total parameters on the real test model (SmolLM2-135M, PTB), per slicing recipe.

    python benchmarks/smollm2_quality.py [--nsamples 16] [--seqlen 256] [--eval-windows 8] [--only NAME ...]
Writes benchmarks/results/smollm2_quality.{json,md,png}. Calibration: PTB train; evaluation: PTB test
(the protocol is recorded in the JSON). Rows measured under another protocol are dropped on merge.

Issue 12 families are measured at total-parameter targets (a fraction of the dense *tied* model's count,
shortcuts, table and head included), so every method is compared at the same size:
  reference          untied head, one uniform width (the reference SliceGPT recipe), widths fitted to the target
  tied               one sliced token table shared with the head, Q_0 from the first stream, uniform width
  tied+joint         ... Q_0 from the first stream and the head input (tie basis)
  tied+share-layer   ... one rotation per layer (one shortcut per layer instead of two)
  tied+share-all     ... one rotation for the whole model (no shortcuts)
  tied+budget        ... per-position widths from the dense PCA spectra (one explained-variance fraction)
  all                joint tie basis + shared layer rotation + variance budget
  project+share-layer  full V x D table kept (--tie project: exact head), one rotation per layer
  joint+share-all    joint tie basis + one rotation for the whole model (one width, so no budget)
Issue 9 (MoDeGPT, tied table and head kept: it never touches the residual stream):
  modegpt            "modegpt 0.25": 25 % of the block parameters removed; "modegpt 75%": the block
                     compression solved so the total is 75 % of the dense tied total
  slicegpt+modegpt   an "all"-style slice first, then MoDeGPT with the compression solved for a total target
  "<family> @<row>"  the family's recipe at the *measured* total of another row (e.g. SliceGPT and the
                     combination at the size of "modegpt 0.25"); that row must be measured first
`--only` takes recipe or family names; a family name also selects its --slice recipes (e.g. "tied 0.25").
Also writes a slice-0 invariance table (max |logit difference| vs the HF model) on the tiny random models.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from common import RESULTS, machine_info, write_results
from toolchain.model.adapters import to_canonical
from toolchain.compress.modegpt import ModegptOptions, block_parameters_total, modegpt_model
from toolchain.compress.options import SliceOptions
from toolchain.compress.slicegpt import slice_model
from toolchain.data.text import eval_windows, load_text, token_windows
from runtime.evaluate import perplexity
from toolchain.model.modeling import count_parameters
from toolchain.data.sources import load_hf_model, resolve_model

# name -> (keep_tie, SliceOptions kwargs; "target_ratio" is a fraction of the dense tied total, "match" the name
# of a measured row whose total is the target; "method" selects MoDeGPT, see compress()); None: dense
RECIPES = {
    "dense": (True, None),
    "reference 0.10": (False, dict(slice=0.10)),
    "reference 0.20": (False, dict(slice=0.20)),
    "reference 0.25": (False, dict(slice=0.25)),
    "reference 0.30": (False, dict(slice=0.30)),
    "identity-rotation 0.25": (False, dict(slice=0.25, rotation="identity")),
    "random-rotation 0.25": (False, dict(slice=0.25, rotation="random")),
    **{f"tied {s:.2f}": (True, dict(slice=s, tie_basis="first")) for s in (0.10, 0.20, 0.25, 0.30)},
    **{f"tied+joint {s:.2f}": (True, dict(slice=s, tie_basis="joint")) for s in (0.10, 0.20, 0.25, 0.30)},
    "tied-project 0.25": (True, dict(slice=0.25, tie="project")),
}
UNIFORM_FIRST = dict(budget="uniform", tie_basis="first")
ALL = dict(budget="variance", tie_basis="joint", share="layer")
# family -> (keep_tie, options, target ratios); single-point families were cut to fit the machine's time
FAMILIES = {
    "reference": (False, dict(budget="uniform"), (0.95, 0.9, 0.8, 0.75, 0.7, 0.6)),
    "tied": (True, UNIFORM_FIRST, (0.9, 0.8, 0.7)),
    "tied+joint": (True, dict(budget="uniform", tie_basis="joint"), (0.9, 0.8, 0.7)),
    "tied+share-layer": (True, dict(UNIFORM_FIRST, share="layer"), (0.9, 0.8, 0.7)),
    "tied+share-all": (True, dict(UNIFORM_FIRST, share="all"), (0.8,)),
    "project+share-layer": (True, dict(budget="uniform", tie="project", share="layer"), (0.8,)),
    "tied+budget": (True, dict(budget="variance", tie_basis="first"), (0.8,)),
    "all": (True, ALL, (0.9, 0.8, 0.75, 0.7, 0.6)),
    "joint+share-all": (True, dict(budget="uniform", tie_basis="joint", share="all"), (0.9, 0.8, 0.7)),
}
for _family, (_keep, _options, _ratios) in FAMILIES.items():
    for _ratio in _ratios:
        RECIPES[f"{_family} {_ratio:.0%}"] = (_keep, dict(_options, target_ratio=_ratio))
# Same-size comparisons: MoDeGPT at 25 % of the block parameters and at 75 % of the total; SliceGPT ("reference", best "all")
# and slicegpt+modegpt (split: "all" slice to 90 % — slicegpt95: 95 % — of the dense total, then MoDeGPT with the
# compression that lands on the target) at MoDeGPT's measured size
MODEGPT_25 = "modegpt 0.25"
RECIPES |= {
    MODEGPT_25: (True, dict(method="modegpt", compression=0.25)),
    f"reference @{MODEGPT_25}": (False, dict(FAMILIES["reference"][1], match=MODEGPT_25)),
    f"all @{MODEGPT_25}": (True, dict(ALL, match=MODEGPT_25)),
    f"slicegpt+modegpt @{MODEGPT_25}": (True, dict(method="slicegpt+modegpt", slice=dict(ALL, target_ratio=0.9),
                                                   match=MODEGPT_25)),
    f"slicegpt95+modegpt @{MODEGPT_25}": (True, dict(method="slicegpt+modegpt", slice=dict(ALL, target_ratio=0.95),
                                                     match=MODEGPT_25)),  # the other split: less slicing
    "modegpt 75%": (True, dict(method="modegpt", target_ratio=0.75)),
    "slicegpt+modegpt 75%": (True, dict(method="slicegpt+modegpt", slice=dict(ALL, target_ratio=0.9),
                                        target_ratio=0.75)),
    "slicegpt95+modegpt 75%": (True, dict(method="slicegpt+modegpt", slice=dict(ALL, target_ratio=0.95),
                                          target_ratio=0.75)),
}
SAME_SIZE = {  # one report table per total size
    f"at the size of {MODEGPT_25}": [MODEGPT_25, f"reference @{MODEGPT_25}", f"all @{MODEGPT_25}",
                                      f"slicegpt+modegpt @{MODEGPT_25}", f"slicegpt95+modegpt @{MODEGPT_25}"],
    "at 75 % of the dense total": ["modegpt 75%", "reference 75%", "all 75%", "slicegpt+modegpt 75%",
                                   "slicegpt95+modegpt 75%"],
}
TARGETS = (0.9, 0.8, 0.7)  # the goal: at 10/20/30 % fewer total parameters ...
WANTED_REDUCTION = 0.30  # ... perplexity at least 30 % lower than the reference at the same size


def target_of(kwargs: dict, source_params: int, rows: dict) -> int | None:
    """Total parameters to land on: a fraction of the dense tied total, or another row's measured total."""
    if "match" in kwargs:
        if kwargs["match"] not in rows:
            sys.exit(f"recipe needs the row {kwargs['match']!r} measured first (same protocol); run it too")
        return rows[kwargs["match"]]["parameters"]
    return int(kwargs["target_ratio"] * source_params) if "target_ratio" in kwargs else None


def slice_options(kwargs: dict, source_params: int, rows: dict) -> SliceOptions:
    target = target_of(kwargs, source_params, rows)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("target_ratio", "match")}
    return SliceOptions(**kwargs, target_params=target)


def compress(model, calib, kwargs: dict, source_params: int, rows: dict) -> dict:
    """Compress in place with the recipe's method; returns what the row records besides the counts.
    MoDeGPT's `compression` is the fraction of block parameters removed; with a total target instead, it is
    solved from the (possibly sliced) model's block count: (total − target) / block parameters. The
    per-layer rounding of the kept dims leaves the total within a few thousand parameters of the target."""
    method = kwargs.get("method", "slicegpt")
    if method == "slicegpt":
        slice_model(model, calib.input_ids, calib.attention_mask, slice_options(kwargs, source_params, rows))
        return {}
    if method == "slicegpt+modegpt":  # = compress.modegpt.slicegpt_modegpt_model, split to solve the compression
        slice_model(model, calib.input_ids, calib.attention_mask, slice_options(kwargs["slice"], source_params, rows))
    target = target_of(kwargs, source_params, rows)
    compression = kwargs.get("compression")
    if target is not None:
        compression = (count_parameters(model).total - target) / block_parameters_total(model)
    modegpt_model(model, calib.input_ids, calib.attention_mask, ModegptOptions(compression=compression))
    record = model.config.compression.get("modegpt", model.config.compression)
    layers = record["layers"]
    mean = lambda key: round(sum(layer[key] for layer in layers) / len(layers), 4)  # noqa: E731
    return {"modegpt": {"compression": round(compression, 4), "achieved": round(record["achieved"], 4),
                        "layer_sparsity": [round(layer["sparsity"], 3) for layer in layers],
                        "mean_mlp_error": mean("mlp_error"), "mean_vo_error": mean("vo_error"),
                        "mean_qk_score_kept": mean("qk_score_kept")}}


def family_of(name: str) -> str:
    if name == "dense":
        return "dense"
    return name.split(" @", 1)[0] if " @" in name else name.rsplit(" ", 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=None, help="recipe names or family names")
    parser.add_argument("--skip-invariance", action="store_true")
    args = parser.parse_args()
    protocol = {k: getattr(args, k) for k in ("nsamples", "seqlen", "eval_seqlen", "eval_windows")}

    hf, tokenizer = load_hf_model(resolve_model("smollm2-135m"))
    source_params = count_parameters(hf).total
    canonical = {keep: to_canonical(hf, source_model="smollm2-135m", keep_tie=keep) for keep in (True, False)}
    calib = token_windows(tokenizer, load_text("ptb", "train"), args.nsamples, args.seqlen, seed=0)
    test = eval_windows(tokenizer, load_text("ptb", "test"), args.eval_seqlen, max_windows=args.eval_windows)
    previous = RESULTS / "smollm2_quality.json"
    old = json.loads(previous.read_text()) if previous.exists() else {}
    rows = {r["name"]: r for r in old.get("rows", []) if r.get("protocol") == protocol}
    for name, (keep_tie, kwargs) in RECIPES.items():
        if args.only and name not in args.only and family_of(name) not in args.only:
            continue
        start = time.perf_counter()
        model = copy.deepcopy(canonical[keep_tie])
        extra = {} if kwargs is None else compress(model, calib, kwargs, source_params, rows)
        params = count_parameters(model)
        result = perplexity(model, tokenizer, test, seqlen=args.eval_seqlen)
        rows[name] = {"name": name, "ppl": round(result["ppl"], 3), "parameters": params.total,
                      "shortcuts": params.shortcuts, "embeddings": params.embeddings, "lm_head": params.lm_head,
                      "kept_vs_source": round(params.total / source_params, 4), "options": kwargs,
                      "keep_tie": keep_tie, "tied": params.tied, "widths": model.config.residual_widths,
                      "protocol": protocol, **extra, "seconds": round(time.perf_counter() - start, 1)}
        print({k: v for k, v in rows[name].items() if k != "widths"}, flush=True)
        del model
        save(rows, protocol, source_params, calib, test, None)  # after every row: a long batch can be cut short
    payload = save(rows, protocol, source_params, calib, test, None if args.skip_invariance else invariance_table())
    print(markdown(payload))


def save(rows: dict, protocol: dict, source_params: int, calib, test, invariance: dict | None) -> dict:
    """Merge `rows` into the results (re-read: another batch (--only) may have finished meanwhile) and write
    them; `invariance` None keeps the stored table."""
    previous = RESULTS / "smollm2_quality.json"
    latest = json.loads(previous.read_text()) if previous.exists() else {}
    merged = {r["name"]: r for r in latest.get("rows", []) if r.get("protocol") == protocol} | rows
    payload = {"benchmark": "smollm2_quality", "machine": machine_info(), "source_parameters": source_params,
               "calibration": calib.protocol | {"text": "ptb train"}, "evaluation": test.protocol | {"text": "ptb test"},
               "protocol": protocol, "rows": sorted(merged.values(), key=lambda r: -r["parameters"]),
               "invariance": invariance or latest.get("invariance"),
               "other_protocol_rows": [r for r in latest.get("rows", []) + latest.get("other_protocol_rows", [])
                                       if r.get("protocol") != protocol and r["name"] not in merged]}
    payload["targets"] = target_check(payload)
    write_results("smollm2_quality", payload, markdown(payload))
    plot(payload)
    return payload


# ---- targets: compare at the same total size, on the reference curve interpolated in log-ppl ----

def reference_ppl_at(rows: list[dict], params: int) -> float | None:
    curve = sorted((r["parameters"], math.log(r["ppl"])) for r in rows if family_of(r["name"]) == "reference")
    for (p0, l0), (p1, l1) in zip(curve, curve[1:]):
        if p0 <= params <= p1:
            return math.exp(l0 + (l1 - l0) * (params - p0) / (p1 - p0))
    return None  # outside the measured reference range: no claim


def target_check(payload: dict) -> list[dict]:
    checks = []
    for row in payload["rows"]:
        ratio = (row.get("options") or {}).get("target_ratio")
        if ratio not in TARGETS or family_of(row["name"]) == "reference":
            continue
        reference = reference_ppl_at(payload["rows"], row["parameters"])
        reduction = None if reference is None else 1.0 - row["ppl"] / reference
        checks.append({"recipe": row["name"], "target_ratio": ratio, "parameters": row["parameters"],
                       "kept_vs_source": row["kept_vs_source"], "ppl": row["ppl"],
                       "reference_ppl_same_size": None if reference is None else round(reference, 3),
                       "reduction": None if reduction is None else round(reduction, 4),
                       "met": reduction is not None and reduction >= WANTED_REDUCTION})
    return checks


# ---- slice-0 invariance of every new mode on the tiny random-weight models ----

INVARIANCE_MODES = {
    "tie-basis joint": dict(tie_basis="joint"),
    "share layer": dict(share="layer"),
    "share all": dict(share="all"),
    "share all + head": dict(share="all", slice_head=True),
    "budget global (+share layer)": dict(target_params=10**9, budget="global", share="layer"),
    "budget variance": dict(target_params=10**9, budget="variance"),
}


def invariance_table() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import ARCHS, VOCAB, batch_with_left_padding, tiny_hf_model

    gen = torch.Generator().manual_seed(3)
    cal_ids = torch.randint(3, VOCAB, (16, 24), generator=gen)
    ids, mask, pos = batch_with_left_padding()
    table = {}
    for arch in ARCHS:
        hf = tiny_hf_model(arch)
        dense = to_canonical(hf)
        with torch.no_grad():
            reference = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        table[arch] = {}
        for mode, options in INVARIANCE_MODES.items():
            applies = not (mode.startswith("tie") and not dense.config.tie_word_embeddings) and \
                not (mode == "share layer" and dense.config.parallel_block)
            if not applies:
                table[arch][mode] = None
                continue
            model = slice_model(copy.deepcopy(dense), cal_ids, torch.ones_like(cal_ids), SliceOptions(slice=0.0, **options))
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            table[arch][mode] = float((logits - reference)[mask.bool()].abs().max())
    return {"dtype": "float32", "metric": "max |logits - HF logits| at slice 0 (n/a: mode does not apply)",
            "table": table}


# ---- reports ----

def markdown(payload: dict) -> str:
    lines = ["| recipe | total params | vs dense (tied) | shortcuts | PTB ppl |", "|---|---|---|---|---|"]
    for row in payload["rows"]:
        lines.append(f"| {row['name']} | {row['parameters'] / 1e6:.2f}M | {row['kept_vs_source']:.1%} | "
                     f"{row['shortcuts'] / 1e6:.2f}M | {row['ppl']:.2f} |")
    if payload.get("targets"):
        lines += ["", "Targets: perplexity vs reference SliceGPT at the same total size (interpolated, log-ppl)", "",
                  "| recipe | vs dense | ppl | reference ppl | reduction | ≥30 % |", "|---|---|---|---|---|---|"]
        for check in payload["targets"]:
            ref = "n/a" if check["reference_ppl_same_size"] is None else f"{check['reference_ppl_same_size']:.2f}"
            red = "n/a" if check["reduction"] is None else f"{check['reduction']:.1%}"
            lines.append(f"| {check['recipe']} | {check['kept_vs_source']:.1%} | {check['ppl']:.2f} | {ref} | {red} | "
                         f"{'yes' if check['met'] else 'no'} |")
    by_name = {row["name"]: row for row in payload["rows"]}
    for title, names in SAME_SIZE.items():
        present = [by_name[n] for n in names if n in by_name]
        if len(present) < 2:
            continue
        lines += ["", f"MoDeGPT vs SliceGPT {title} (MoDeGPT: block compression, per-module mean errors)", "",
                  "| recipe | total params | vs dense (tied) | PTB ppl | MoDeGPT compression "
                  "| MLP / VO error, QK score kept |",
                  "|---|---|---|---|---|---|"]
        for row in present:
            mdg = row.get("modegpt")
            cells = ("–", "–") if mdg is None else (
                f"{mdg['compression']:.3f}", f"{mdg['mean_mlp_error']:.3f} / {mdg['mean_vo_error']:.3f}, "
                                             f"{mdg['mean_qk_score_kept']:.3f}")
            lines.append(f"| {row['name']} | {row['parameters'] / 1e6:.2f}M | {row['kept_vs_source']:.1%} | "
                         f"{row['ppl']:.2f} | {cells[0]} | {cells[1]} |")
    if payload.get("invariance"):
        table = payload["invariance"]["table"]
        modes = list(next(iter(table.values())))
        lines += ["", f"Slice-0 invariance ({payload['invariance']['metric']}, float32)", "",
                  "| arch | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
        for arch, cells in table.items():
            lines.append(f"| {arch} | " + " | ".join("n/a" if v is None else f"{v:.1e}" for v in cells.values()) + " |")
    return "\n".join(lines) + "\n"


def plot(payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    dense = next((r["ppl"] for r in payload["rows"] if r["name"] == "dense"), None)
    off_scale = [r for r in payload["rows"] if dense is not None and r["ppl"] > 50 * dense]  # sanity baselines
    families: dict[str, list] = {}
    for row in payload["rows"]:
        if row not in off_scale:
            families.setdefault(family_of(row["name"]), []).append(row)
    colors = plt.get_cmap("tab20").colors
    for index, (family, rows) in enumerate(families.items()):
        rows.sort(key=lambda r: r["parameters"])
        style = dict(marker="o", color=colors[index % len(colors)], linestyle="-", markersize=5)
        if family == "modegpt":
            style |= dict(marker="s", color="black", linewidth=2, markersize=7)
        elif "modegpt" in family:
            style |= dict(marker="*", color="red" if family == "slicegpt+modegpt" else "darkred", markersize=11)
        ax.plot([r["parameters"] / 1e6 for r in rows], [r["ppl"] for r in rows], label=family, **style)
    if off_scale:
        ax.text(0.01, 0.99, "off scale (sanity baselines):\n" + "\n".join(
            f"{r['name']}: ppl {r['ppl']:.3g} at {r['parameters'] / 1e6:.1f}M" for r in off_scale),
            transform=ax.transAxes, va="top", fontsize=7)
    ax.axvline(payload["source_parameters"] / 1e6, color="grey", linestyle=":", label="dense size (tied)")
    ax.set_xlabel("total parameters (M, shortcuts, embeddings and head included)")
    ax.set_ylabel("PTB test perplexity")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: perplexity vs size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "smollm2_quality.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
