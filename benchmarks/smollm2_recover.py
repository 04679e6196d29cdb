"""PTB test perplexity (8 x 512) of a compressed SmolLM2 before and after each recovery method.

    .venv/bin/python benchmarks/smollm2_recover.py MODEL_DIR --method full-distill --steps 40 [--lr 2e-4]

Appends one row per run to benchmarks/results/smollm2_recover.json (recovered models go under
--work, default /tmp/recover-bench). The compressed model: `toolchain slice --model smollm2-135m
--target-ratio 0.8 --share layer --budget variance --out MODEL_DIR` ("all 80 %").
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "smollm2_recover.json"


def ptb_test_ppl(model_dir: Path) -> float:
    from runtime.evaluate import perplexity
    from runtime.loading import load_causal_lm
    from toolchain.data.sources import load_tokenizer
    from toolchain.data.text import eval_windows, load_text

    model, _ = load_causal_lm(model_dir)
    tokenizer = load_tokenizer(model_dir)
    windows = eval_windows(tokenizer, load_text("ptb", "test"), seqlen=512, max_windows=8)
    return perplexity(model, tokenizer, windows, seqlen=512)["ppl"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--method", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--schedule", default="linear")
    parser.add_argument("--ce-weight", type=float, default=0.0, help="distill: weight of cross-entropy mixed in")
    parser.add_argument("--label", default="all 80%")
    parser.add_argument("--work", type=Path, default=Path("/tmp/recover-bench"))
    args = parser.parse_args()

    from toolchain.compress.options import RecoverOptions
    from toolchain.compress.recover import recover_to_dir

    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    before = next((r["ppl_before"] for r in rows if r["model"] == str(args.model_dir)), None)
    if before is None:
        before = ptb_test_ppl(args.model_dir)
    options = RecoverOptions(recover=args.method, recover_steps=args.steps, recover_lr=args.lr,
                             recover_seqlen=args.seqlen, recover_batch=args.batch, recover_eval_every=args.eval_every,
                             recover_schedule=args.schedule, recover_ce_weight=args.ce_weight)
    out = args.work / f"{args.model_dir.name}-{args.method}-{args.steps}-ce{args.ce_weight:g}"
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = recover_to_dir(args.model_dir, out, options, device="cpu", overwrite=True,
                            progress=lambda done, total, note=None: print(note, flush=True))
    wall = time.perf_counter() - start
    after = ptb_test_ppl(out)
    r = result.report
    row = {"label": args.label, "model": str(args.model_dir), "method": args.method, "steps": r["steps"],
           "lr": r["options"]["recover_lr"], "schedule": args.schedule, "batch": f"{args.batch} x {args.seqlen}", "tokens": r["tokens_seen"],
           "wall_seconds": round(wall, 1), "peak_memory_bytes": r["timing"]["peak_memory_bytes"],
           "best_step": r["best"]["step"], "ce_weight": args.ce_weight,
           "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], "ppl_before": before, "ppl_after": after,
           "reduction": 1 - after / before}
    print(json.dumps(row), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows + [row], indent=1) + "\n")


if __name__ == "__main__":
    main()
