"""int4 head-to-head on SmolLM2-135M: onnxruntime-genai's model builder on the dense model against our
builds (dense and compressed, each with our int4), in one run on the same weights.

    python benchmarks/vs_genai_int4.py [--work /tmp/vs_genai_int4] [--only NAME ...] [--rounds 2]

Every variant is scored the same way:
- perplexity with plain ONNX Runtime (our OrtSession over the variant's model.onnx, the same windows
  for all: PTB test, 8 x 512 tokens, runtime.evaluate.perplexity);
- bytes on disk of the ONNX model files (model.onnx + external data);
- TTFT and decode ms/token through onnxruntime-genai's own Generator (our builds packaged by
  `toolchain build --deploy genai`), decode steps interleaved across all variants in lockstep
  (benchmarks/ort_vs_genai.py's timed_rounds), so machine load hits every variant alike.
Our variants are made by the CLI a user runs (`toolchain build ... --quantize int4 --deploy genai`), so
the numbers are what the README's commands give. Builds are cached under --work.
Writes benchmarks/results/vs_genai_int4.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine_info, write_results  # noqa: E402
from ort_vs_genai import PROMPT, file_bytes, genai_build, timed_rounds  # noqa: E402

MODEL = "smollm2-135m"
EVAL_WINDOWS, EVAL_SEQLEN = 8, 512
CALIB = ["--calib", "ptb", "--nsamples", "16", "--seqlen", "256"]
INT4 = ["--quantize", "int4", "--block-size", "32", "--quantize-embeddings"]
GPTQ = [*INT4, "--quant-algorithm", "gptq"]
HEAD4 = ["--residual-bits", "4"]  # head (one int4 table shared with the lookup), head_proj, shortcuts at 4 bits

# name -> `toolchain build` arguments (after --model/--out); None = the peer's builder
VARIANTS: dict[str, list[str] | None] = {
    "peer: genai builder int4 (dense)": None,
    "ours: dense int4 RTN, head 4-bit": ["--method", "none", *INT4, "--quant-algorithm", "minmax", *HEAD4],
    "ours: dense int4 GPTQ, head 4-bit": ["--method", "none", *GPTQ, *HEAD4],
    "ours: dense int4 GPTQ, head 8-bit": ["--method", "none", *GPTQ],
    "ours: dense + hadamard int4 GPTQ, head 4-bit": ["--method", "none", "--rotate", "hadamard", *GPTQ, *HEAD4],
    "ours: dense + random rotation int4 GPTQ, head 4-bit": ["--method", "none", "--rotate", "random", *GPTQ, *HEAD4],
    "ours: sliced 0.3 int4 GPTQ, head 8-bit": ["--slice", "0.3", *GPTQ],
    "ours: SliceGPT 'all' 80 % int4 GPTQ, head 8-bit": ["--share", "all", "--target-ratio", "0.8", *GPTQ],
    "ours: MoDeGPT 0.25 int4 GPTQ, head 8-bit": ["--method", "modegpt", "--compression", "0.25", *GPTQ],
}
PEER = "peer: genai builder int4 (dense)"


def _log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def build_variant(work: Path, name: str, args: list[str]) -> Path:
    """`toolchain build` as a user runs it; an existing build resumes (and is skipped when current)."""
    out = work / name.split(": ", 1)[1].replace(" ", "-").replace("'", "").replace("%", "pct").replace(",", "")
    command = [str(Path(sys.executable).with_name("toolchain")), "build", "--model", MODEL, "--out", str(out),
               "--target", "onnx", "--no-bench", "--deploy", "genai", "--quiet", *CALIB, *args]
    _log("build", name)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: {' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return out


def ppl_with_ort(model_dir: Path, windows) -> dict:
    from runtime.evaluate import perplexity
    from runtime.sessions import OrtSession

    return perplexity(OrtSession(model_dir, spinning=False), None, windows)


def eval_windows():
    from toolchain.data.sources import load_tokenizer, resolve_model
    from toolchain.data.text import eval_windows as cut, load_text

    tokenizer = load_tokenizer(resolve_model(MODEL).path)
    return cut(tokenizer, load_text("ptb", "test"), EVAL_SEQLEN, EVAL_WINDOWS)


def measure(work: Path, names: list[str], rounds: int) -> dict:
    windows = eval_windows()
    fp32 = genai_build(work, "fp32")
    rows: dict[str, dict] = {"dense fp32 (reference)": {"onnx_dir": str(fp32), "genai_dir": str(fp32)}}
    for name in names:
        if VARIANTS[name] is None:
            peer = genai_build(work, "int4")
            rows[name] = {"onnx_dir": str(peer), "genai_dir": str(peer)}
        else:
            build = build_variant(work, name, VARIANTS[name])
            report = json.loads((build / "quantized" / "quantize_report.json").read_text())
            rows[name] = {"onnx_dir": str(build / "quantized"), "genai_dir": str(build / "deploy"),
                          "build_args": VARIANTS[name], "quantize_report": report}
    for name, row in rows.items():
        _log("perplexity", name)
        result = ppl_with_ort(Path(row["onnx_dir"]), windows)
        row.update(ppl=result["ppl"], tokens=result["tokens"], bytes=file_bytes(Path(row["onnx_dir"])))
    _log("latency through onnxruntime-genai,", rounds, "interleaved rounds")
    prompt = np.random.default_rng(0).integers(100, 40000, (1, PROMPT), dtype=np.int64)
    timing = timed_rounds({name: {"kind": "genai", "path": Path(row["genai_dir"])} for name, row in rows.items()},
                          prompt, rounds)
    for name, t in timing.items():
        rows[name].update(ttft_ms=t["ttft_ms"], decode_ms=t["decode_p50_ms"], decode_p90_ms=t["decode_p90_ms"])
    return rows


def targets(rows: dict) -> list[dict]:
    ref = rows["dense fp32 (reference)"]["ppl"]
    peer = rows.get(PEER)
    if peer is None:
        return []
    excess = peer["ppl"] / ref - 1
    out = []
    dense = {n: r for n, r in rows.items() if n.startswith("ours: dense")}
    if dense:
        best_name, best = min(dense.items(), key=lambda kv: kv[1]["ppl"])
        closer = 1 - (best["ppl"] / ref - 1) / excess if excess > 0 else None
        out += [
            {"target": "dense int4: ppl ≥ 40 % closer to fp32 than the peer's", "measured":
             f"{best_name}: +{best['ppl'] / ref - 1:.1%} vs peer +{excess:.1%} ({closer:.0%} closer)",
             "met": closer is not None and closer >= 0.40},
            {"target": "dense int4: size ≤ the peer's", "measured": f"{best['bytes'] / 1e6:.1f} vs {peer['bytes'] / 1e6:.1f} MB",
             "met": best["bytes"] <= peer["bytes"]},
            {"target": "dense int4: decode ≤ 1.05 × the peer's", "measured":
             f"{best['decode_ms']:.2f} vs {peer['decode_ms']:.2f} ms ({best['decode_ms'] / peer['decode_ms']:.3f}×)",
             "met": best["decode_ms"] <= 1.05 * peer["decode_ms"]}]
    compressed = {n: r for n, r in rows.items() if n.startswith("ours:") and not n.startswith("ours: dense")}
    winners = [n for n, r in compressed.items() if r["bytes"] < peer["bytes"] and r["decode_ms"] < peer["decode_ms"]
               and r["ppl"] <= 1.10 * peer["ppl"]]
    if compressed:
        out.append({"target": "a compressed model smaller and faster than the peer, ppl within 10 %",
                    "measured": ", ".join(winners) if winners else "none: " + "; ".join(
                        f"{n}: {r['bytes'] / 1e6:.1f} MB, {r['decode_ms']:.2f} ms, ppl {r['ppl']:.1f}"
                        for n, r in compressed.items()), "met": bool(winners)})
    return out


def render(p: dict) -> str:
    rows, ref = p["rows"], p["rows"]["dense fp32 (reference)"]["ppl"]
    lines = ["# int4 on SmolLM2-135M: onnxruntime-genai's builder vs our builds", "",
             f"Perplexity: PTB test, {EVAL_WINDOWS} x {EVAL_SEQLEN} tokens, plain ONNX Runtime CPU. Size: ONNX files on "
             f"disk. Latency: onnxruntime-genai {p['genai_version']} Generator, {PROMPT}-token prompt, greedy decode, "
             f"{p['rounds']} rounds interleaved in lockstep across variants; {p['machine']['cpu_count']} CPU cores, "
             f"load average {', '.join(f'{x:.1f}' for x in p['load_average'])} during the run.", "",
             "| variant | ppl | vs fp32 | MB on disk | decode ms/token | TTFT ms |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ppl']:.2f} | {r['ppl'] / ref - 1:+.1%} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['decode_ms']:.2f} | {r['ttft_ms']:.0f} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in p["targets"]]
    lines += ["", "## How each of ours was built", ""]
    lines += [f"- {n}: `toolchain build --model {MODEL} --target onnx {' '.join(CALIB + r['build_args'])} --deploy genai`"
              for n, r in rows.items() if r.get("build_args")]
    return "\n".join(lines) + "\n"


def plot(p: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    slowest = max(r["decode_ms"] for r in p["rows"].values())
    for name, r in p["rows"].items():
        color = "tab:gray" if name.startswith("peer") or name.startswith("dense fp32") else (
            "tab:blue" if name.startswith("ours: dense") else "tab:orange")
        ax.scatter(r["bytes"] / 1e6, r["ppl"], s=400 * r["decode_ms"] / slowest, color=color, alpha=0.7)
        ax.annotate(f"{name} ({r['decode_ms']:.1f} ms)", (r["bytes"] / 1e6, r["ppl"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("MB on disk (log)")
    ax.set_ylabel("PTB test perplexity (lower is better)")
    ax.set_title("SmolLM2-135M int4: size vs perplexity; marker area = decode ms/token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/vs_genai_int4"), help="cache of builds")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="rewrite the .md and .png from the saved JSON")
    args = parser.parse_args()
    json_path = RESULTS / "vs_genai_int4.json"
    if args.render:
        payload = json.loads(json_path.read_text())
    else:
        import onnxruntime_genai

        args.work.mkdir(parents=True, exist_ok=True)
        names = [n for n in VARIANTS if not args.only or any(o in n for o in args.only)]
        rows = measure(args.work, names, args.rounds)
        payload = {"model": MODEL, "rounds": args.rounds, "machine": machine_info(),
                   "genai_version": onnxruntime_genai.__version__, "load_average": list(os.getloadavg()),
                   "rows": rows}
        payload["targets"] = targets(rows)
        write_results("vs_genai_int4", payload, render(payload))
    (RESULTS / "vs_genai_int4.md").write_text(render(payload))
    plot(payload, RESULTS / "vs_genai_int4.png")
    print(render(payload))


if __name__ == "__main__":
    main()
