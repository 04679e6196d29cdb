"""The few numbers a build ends with, read from the reports its stages wrote: latency of the
compressed model (and of its quantized graph) next to the dense source with the ideal ratio, the
perplexity before and after, the size on disk of each deliverable, and where the full reports are.
Reads JSON only (no torch), so `toolchain inspect` can show it too."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from toolchain.core.build_reports import build_reports

# stage outputs a user takes away (the reports are listed separately)
DELIVERABLES = ("sliced", "recovered", "onnx", "quantized", "deploy", "trt")
REPORTS = ("reports/latency/latency.md", "reports/parity/parity.md", "reports/eval/dense.md",
           "reports/eval/compressed.md", "quantized/quantize_report.json",
           "sliced/compression_report.json", "recovered/recover_report.json")


@dataclass
class LatencyLine:
    """One comparison of the bench report: `variant` against dense on `backend`, p50 milliseconds."""

    backend: str
    variant: str
    phase: str  # "decode": ms per token; "prefill": time to first token
    batch: int
    tokens: int  # prompt length (prefill) or timed steps (decode)
    context: int  # cached tokens before the first timed decode step
    dense_ms: float
    ms: float
    ratio: float  # ms / dense_ms: < 1 is faster
    ideal_ratio: float | None  # bytes streamed (decode) or FLOPs (prefill), variant / dense


@dataclass
class Perplexity:
    dataset: str
    windows: int
    seqlen: int
    dense: float
    compressed: float


@dataclass
class QuantizedAccuracy:
    mode: str
    inputs: str
    ppl_fp32: float
    ppl_quantized: float
    top1: float


@dataclass
class Headline:
    build: Path
    latency: list[LatencyLine] = field(default_factory=list)
    perplexity: Perplexity | None = None
    quantized: QuantizedAccuracy | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # deliverable dir -> bytes on disk
    reports: list[Path] = field(default_factory=list)


def read_headline(build_dir: str | Path, manifest: dict) -> Headline:
    build = Path(build_dir)
    found = build_reports(build)
    return Headline(build=build, latency=latency_lines(found.get("latency")), perplexity=_perplexity(found),
                    quantized=_quantized(found.get("quantize")),
                    sizes=deliverable_sizes(build, manifest),
                    reports=[build / r for r in REPORTS if (build / r).is_file()])


def latency_lines(latency: dict | None) -> list[LatencyLine]:
    """Per compressed variant (sliced, sliced-int4, ...): decode at the smallest batch and the
    longest prompt's TTFT, on the deployed backends (ONNX Runtime, TensorRT); torch eager only when
    nothing else was measured."""
    if latency is None:
        return []
    rows = latency["comparisons"]
    deployed = [r for r in rows if not r["backend"].startswith("torch")]
    rows = deployed or rows
    picked = []
    for key in dict.fromkeys((r["backend"], r["variant"]) for r in rows):
        mine = [r for r in rows if (r["backend"], r["variant"]) == key]
        decode = [r for r in mine if r["phase"] == "decode"]
        prefill = [r for r in mine if r["phase"] == "prefill"]
        if decode:
            batch = min(r["batch"] for r in decode)
            picked.append(min((r for r in decode if r["batch"] == batch), key=lambda r: r["context"]))
        if prefill:
            batch = min(r["batch"] for r in prefill)
            picked.append(max((r for r in prefill if r["batch"] == batch), key=lambda r: r["tokens"]))
    return [LatencyLine(r["backend"], r["variant"], r["phase"], r["batch"], r["tokens"], r["context"],
                        r["dense_ms"], r["sliced_ms"], r["latency_ratio"], r["ideal_ratio"]) for r in picked]


def _perplexity(reports: dict[str, dict]) -> Perplexity | None:
    if not ("eval_dense" in reports and "eval_compressed" in reports):
        return None
    before, after = reports["eval_dense"]["perplexity"], reports["eval_compressed"]["perplexity"]
    return Perplexity(after.get("dataset", "?"), after["windows"], after["seqlen"], before["ppl"], after["ppl"])


def _quantized(report: dict | None) -> QuantizedAccuracy | None:
    if report is None:
        return None
    parity = report["parity"]
    return QuantizedAccuracy(report["quantization"]["mode"], parity["inputs"], parity["ppl_fp32"],
                             parity["ppl_quantized"], parity["top1"])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def deliverable_sizes(build: Path, manifest: dict) -> dict[str, int]:
    """Bytes on disk of every deliverable dir the build's stages wrote, in pipeline order."""
    outputs = [record.get("output") for record in manifest.get("stages", {}).values()
               if record.get("status") == "done"]
    return {name: dir_bytes(build / name) for name in outputs if name in DELIVERABLES and (build / name).is_dir()}
