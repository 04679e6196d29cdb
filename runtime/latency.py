"""Latency harness: time-to-first-token, per-token decode percentiles, throughput and peak memory
of any Session, and `bench_build`, which measures a build's sliced model next to its dense source on
every available backend and puts the ideal (bytes and FLOPs ratios) beside the measured speedup.

Output files (one atomic dir): latency.json, latency.md, prefill_latency.png, decode_throughput.png,
ideal_vs_measured.png.
The JSON's top level doubles as the bench schema of `toolchain.analysis.roofline.fit_efficiency` (gpu, dtype,
n_gpus, results[phase, measured_ms, batch, tokens, context, dtype, model]), so a GPU run can be fed to
`toolchain plan --calibrate`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from toolchain.core.errors import ArtifactError, InvalidOptionError, OutputPathError, ToolchainError
from toolchain.core.versions import library_versions

from runtime.sessions import OrtSession, Session, TorchSession, provider_name

SCHEMA = "toolchain.latency/1"
DEFAULT_PROMPTS = (128, 512, 2048)
DEFAULT_BATCHES = (1, 8)
JSON_FILE, MARKDOWN_FILE = "latency.json", "latency.md"
TOP_KEYS = ("schema", "created", "build", "provider", "gpu", "dtype", "n_gpus", "machine", "versions", "config",
            "models", "results", "comparisons", "skipped")
RESULT_KEYS = ("backend", "variant", "phase", "dtype", "batch", "tokens", "context", "samples", "measured_ms",
               "mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms", "tokens_per_s", "peak_memory_mb",
               "memory_kind", "model")
COMPARISON_KEYS = ("backend", "variant", "phase", "batch", "tokens", "context", "dense_ms", "sliced_ms",
                   "latency_ratio", "speedup", "ideal_ratio", "ideal_speedup", "gap_pct", "weight_bytes_ratio",
                   "read_bytes_ratio", "flops_ratio", "verdict")

Progress = Callable[[int, int], None]


# --- configuration ------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    prompts: tuple[int, ...] = DEFAULT_PROMPTS  # prefill lengths (batch `prefill_batch`)
    batches: tuple[int, ...] = DEFAULT_BATCHES  # decode batch sizes
    steps: int = 20  # timed decode steps per batch
    warmup: int = 3  # untimed decode steps first (allocations, thread pools, caches)
    repeats: int = 3  # timed prefills per prompt length (median reported)
    context: int = 128  # cached tokens before the first decode step
    prefill_batch: int = 1
    max_prompt: int | None = None
    threads: int | None = None  # torch and ORT intra-op threads; None = the libraries' defaults
    seed: int = 0

    def validate(self) -> None:
        for name in ("steps", "repeats", "context", "prefill_batch"):
            if int(getattr(self, name)) < 1:
                raise InvalidOptionError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.warmup < 0:
            raise InvalidOptionError(f"--warmup must be >= 0, got {self.warmup}")
        if not self.prompts or not self.batches:
            raise InvalidOptionError("--prompts and --batches need at least one value each")
        if any(int(v) < 1 for v in (*self.prompts, *self.batches)):
            raise InvalidOptionError(f"prompt lengths and batch sizes must be positive: {self.prompts}, {self.batches}")
        for name in ("max_prompt", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InvalidOptionError(f"--{name.replace('_', '-')} must be a positive integer, got "
                                         f"{getattr(self, name)}")

    def prompt_lengths(self, max_positions: int | None) -> list[int]:
        """Prompt lengths capped by --max-prompt and the model's positions (duplicates dropped)."""
        caps = [c for c in (self.max_prompt, max_positions) if c]
        cap = min(caps) if caps else None
        return sorted({min(int(p), cap) if cap else int(p) for p in self.prompts})

    def decode_context(self, max_positions: int | None) -> int:
        """The cache length to decode from, leaving room for warm-up and timed steps."""
        if not max_positions:
            return self.context
        room = max_positions - self.warmup - self.steps
        if room < 1:
            raise InvalidOptionError(f"the model has {max_positions} positions, fewer than --warmup {self.warmup} + "
                                     f"--steps {self.steps} + 1; lower --steps")
        return min(self.context, room)


def parse_ints(text: str | Iterable[int] | None, name: str) -> tuple[int, ...] | None:
    """'128,512' → (128, 512); a clear error for anything else."""
    if text is None or not isinstance(text, str):
        return None if text is None else tuple(int(v) for v in text)
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InvalidOptionError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise InvalidOptionError(f"--{name} must be positive integers, got {text!r}")
    return values


# --- memory -------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory over a region: torch's allocator on CUDA, else the process's peak RSS.

    Linux lets a process reset its RSS high-water mark (write 5 to /proc/self/clear_refs), so each
    measurement gets its own peak; elsewhere ru_maxrss is the peak since the process started.
    """

    def __init__(self, device: str = "cpu"):
        self.cuda = device == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else ("rss_peak" if _can_reset_rss() else "rss_peak_since_start")

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self.kind == "rss_peak":
            _reset_rss_peak()

    def peak_mb(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        hwm = _status_kib("VmHWM")
        kib = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib / 1024


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _can_reset_rss() -> bool:
    try:
        _reset_rss_peak()
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


# --- measuring one session ----------------------------------------------------------------------


def percentiles(samples_ms: list[float]) -> dict:
    """p50 ≤ p90 ≤ p99 by linear interpolation (numpy's default), plus mean/min/max."""
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean_ms": float(a.mean()), "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "min_ms": float(a.min()), "max_ms": float(a.max())}


def _ids(rng: np.random.Generator, vocab: int, batch: int, length: int) -> np.ndarray:
    return rng.integers(0, vocab, size=(batch, length), dtype=np.int64)


def _synthetic_past(session: Session, batch: int, length: int, rng: np.random.Generator):
    """A full cache of random values: decode cost depends on the cache's shape, not its contents,
    and this skips a (batch × context) prefill that can take minutes for a 1B model on a CPU."""
    return [(rng.standard_normal((batch, s.heads, length, s.key_dim)).astype(session.kv_dtype),
             rng.standard_normal((batch, s.heads, length, s.value_dim)).astype(session.kv_dtype))
            for s in session.kv_shapes]


def time_prefill(session: Session, batch: int, length: int, repeats: int, rng) -> list[float]:
    """Wall ms of prompt → first token (one forward with an empty cache, then argmax), per repeat."""
    ids = _ids(rng, session.vocab_size, batch, length)
    mask = np.ones_like(ids)
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), ids.shape).copy()
    times = []
    for _ in range(repeats):
        past = session.empty_past(batch)
        start = time.perf_counter()
        logits, _ = session.run(ids, mask, positions, past)
        logits[:, -1].argmax(-1)
        times.append((time.perf_counter() - start) * 1e3)
    return times


class DecodeLoop:
    """Greedy decode one token per row per `step()`, from a synthetic cache of `context` tokens."""

    def __init__(self, session: Session, batch: int, context: int, rng: np.random.Generator):
        self.session, self.batch, self.total = session, batch, context
        self.past = _synthetic_past(session, batch, context, rng)
        self.next_ids = _ids(rng, session.vocab_size, batch, 1)

    def step(self) -> float:
        """Wall ms of one step, argmax included."""
        self.total += 1
        mask = np.ones((self.batch, self.total), dtype=np.int64)
        positions = np.full((self.batch, 1), self.total - 1, dtype=np.int64)
        start = time.perf_counter()
        logits, self.past = self.session.run(self.next_ids, mask, positions, self.past)
        self.next_ids = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        return (time.perf_counter() - start) * 1e3


def time_decode(session: Session, batch: int, context: int, warmup: int, steps: int, rng) -> list[float]:
    """Wall ms per decode step (one new token per row, argmax included) after `warmup` steps."""
    loop = DecodeLoop(session, batch, context, rng)
    times = [loop.step() for _ in range(warmup + steps)]
    return times[warmup:]


def interleaved_decode(sessions: dict[str, Session], batch: int, context: int, warmup: int, steps: int,
                       seed: int = 0) -> dict[str, list[float]]:
    """Decode on several sessions in lockstep, one step each in turn (order reversed every step).

    On a shared machine the bandwidth left to us drifts by tens of % over minutes; measuring dense
    and sliced minutes apart folds that drift into their ratio, alternating steps cancels it."""
    rng = np.random.default_rng(seed)
    loops = {name: DecodeLoop(session, batch, context, rng) for name, session in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for step in range(warmup + steps):
        order = list(loops) if step % 2 == 0 else list(reversed(loops))
        for name in order:
            elapsed = loops[name].step()
            if step >= warmup:
                times[name].append(elapsed)
    return times


def _result(backend, variant, phase, dtype, batch, tokens, context, samples, measured, memory, peak, model) -> dict:
    stats = percentiles(samples)
    seconds = measured / 1e3
    produced = batch * tokens  # prefill: prompt tokens processed; decode: tokens generated
    return {"backend": backend, "variant": variant, "phase": phase, "dtype": dtype, "batch": batch,
            "tokens": tokens, "context": context, "samples": len(samples), "measured_ms": measured, **stats,
            "tokens_per_s": produced / seconds, "peak_memory_mb": peak, "memory_kind": memory.kind,
            "model": model}


def measure_session(session: Session, config: BenchConfig, variant: str = "model", dtype: str = "fp32",
                    max_positions: int | None = None, model: dict | None = None,
                    tick: Callable[[], None] | None = None) -> list[dict]:
    """Prefill at every prompt length and decode at every batch size; one result dict each (RESULT_KEYS).

    Prefill: `measured_ms` is the median time-to-first-token, percentiles over `repeats`.
    Decode: `measured_ms` is the total of the `steps` timed steps (fit_efficiency's convention),
    percentiles are per step, `context` is the cache length before the first timed step.
    """
    config.validate()
    rng = np.random.default_rng(config.seed)
    on_cuda = isinstance(session, TorchSession) and session.device.type == "cuda"
    memory = PeakMemory("cuda" if on_cuda else "cpu")  # ORT's CUDA arena is invisible to torch: RSS there
    backend = session.name
    time_prefill(session, 1, 8, 1, rng)  # first call: allocator, thread pool and kernel selection
    results = []
    for length in config.prompt_lengths(max_positions):
        memory.reset()
        times = time_prefill(session, config.prefill_batch, length, config.repeats, rng)
        results.append(_result(backend, variant, "prefill", dtype, config.prefill_batch, length, 0, times,
                               float(np.median(times)), memory, memory.peak_mb(), model))
        tick and tick()
    context = config.decode_context(max_positions)
    for batch in config.batches:
        memory.reset()
        times = time_decode(session, batch, context, config.warmup, config.steps, rng)
        results.append(_result(backend, variant, "decode", dtype, batch, config.steps, context + config.warmup,
                               times, float(np.sum(times)), memory, memory.peak_mb(), model))
        tick and tick()
    return results


# --- what the model should cost -----------------------------------------------------------------


@dataclass
class ModelCost:
    """Counts from the model's own parameters (shared tensors once), the basis of the ideal ratios."""

    params: int  # every parameter
    matmul_params: int  # weights of Linear layers: blocks, shortcuts, head (and head_proj/embed_proj)
    read_params: int  # what one forward streams: all but lookup-only embedding tables
    shortcut_params: int
    embedding_params: int
    kv_elements_per_token: int  # per sequence, all layers, keys + values
    attention_macs: list[int]  # per layer: query heads × (qk + v head dims), times the attended length
    max_positions: int | None = None
    # a quantized graph: the bytes its initializers take (all / all but lookup-only tables), which
    # replace params × dtype bytes; the KV cache keeps the activation dtype
    stored_bytes: int | None = None
    stored_read_bytes: int | None = None

    def weight_bytes(self, dtype: str) -> int:
        return self.stored_bytes if self.stored_bytes is not None else self.params * _bytes(dtype)

    def read_bytes(self, dtype: str) -> int:
        return self.stored_read_bytes if self.stored_read_bytes is not None else self.read_params * _bytes(dtype)

    @property
    def flops_per_token(self) -> int:
        """Matmul FLOPs of one token without attention over the cache (2 per multiply-add)."""
        return 2 * self.matmul_params

    def forward_flops(self, batch: int, new: int, past: int) -> float:
        """Matmuls for every new token (the graph computes logits at every position) + causal attention."""
        attention = sum(2 * macs * (new * past + new * (new + 1) / 2) for macs in self.attention_macs)
        return batch * (self.flops_per_token * new + attention)

    def decode_bytes(self, dtype: str, batch: int, cached: int) -> float:
        return self.read_bytes(dtype) + batch * cached * self.kv_elements_per_token * _bytes(dtype)

    def as_result_model(self, dtype: str) -> dict:
        """The `model` entry of a bench result as fit_efficiency reads it. Its `weight_bytes` is what a
        forward streams (roofline convention: a lookup-only embedding table is not read whole)."""
        return {"params": self.params, "weight_bytes": self.read_bytes(dtype),
                "kv_bytes_per_token": self.kv_elements_per_token * _bytes(dtype),
                "flops_per_token": self.flops_per_token}

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(flops_per_token=self.flops_per_token, weight_bytes_fp32=self.params * 4,
                   read_bytes_fp32=self.read_params * 4)
        return out


def _bytes(dtype: str) -> int:
    return 2 if dtype in ("fp16", "bf16") else 4


def model_cost(model) -> ModelCost:
    """ModelCost of a torch causal LM (canonical or HF), from its config by the one size model."""
    from toolchain.model import sizes

    decoder = sizes.describe(model.config)
    params = sizes.parameters(decoder)
    return ModelCost(
        params=params.total, matmul_params=params.matmul, read_params=params.total - params.lookup,
        shortcut_params=params.report.shortcuts, embedding_params=params.tables,
        kv_elements_per_token=sizes.kv_elements_per_token(decoder), attention_macs=sizes.attention_macs(decoder),
        max_positions=getattr(model.config, "max_position_embeddings", None))


def _ratio(new: float, old: float) -> float | None:
    return new / old if old else None


def compare(results: list[dict], costs: dict[str, ModelCost], dense: str = "dense") -> list[dict]:
    """For every non-dense variant and backend measured on both: the measured latency ratio
    (variant/dense, < 1 is faster) next to the ideal one — bytes streamed for decode, FLOPs for
    prefill — so a slice that is slower in practice shows as such (COMPARISON_KEYS)."""
    index = {(r["backend"], r["variant"], r["phase"], r["batch"], r["tokens"]): r for r in results}
    rows = []
    for r in results:
        variant = r["variant"]
        base = index.get((r["backend"], dense, r["phase"], r["batch"], r["tokens"]))
        if variant == dense or base is None or variant not in costs or dense not in costs:
            continue
        cost, dense_cost, dtype = costs[variant], costs[dense], r["dtype"]
        if r["phase"] == "decode":
            dense_ms, ms = base["p50_ms"], r["p50_ms"]  # per token
            middle = r["context"] + r["tokens"] // 2
            ideal = _ratio(cost.decode_bytes(dtype, r["batch"], middle),
                           dense_cost.decode_bytes(dtype, r["batch"], middle))
        else:
            dense_ms, ms = base["measured_ms"], r["measured_ms"]
            ideal = _ratio(cost.forward_flops(r["batch"], r["tokens"], 0),
                           dense_cost.forward_flops(r["batch"], r["tokens"], 0))
        ratio = ms / dense_ms
        gap = (ratio / ideal - 1) * 100 if ideal else None
        rows.append({
            "backend": r["backend"], "variant": variant, "phase": r["phase"], "batch": r["batch"],
            "tokens": r["tokens"], "context": r["context"], "dense_ms": dense_ms, "sliced_ms": ms,
            "latency_ratio": ratio, "speedup": dense_ms / ms, "ideal_ratio": ideal,
            "ideal_speedup": 1 / ideal if ideal else None, "gap_pct": gap,
            "weight_bytes_ratio": _ratio(cost.params, dense_cost.params),
            "read_bytes_ratio": _ratio(cost.read_params, dense_cost.read_params),
            "flops_ratio": _ratio(cost.flops_per_token, dense_cost.flops_per_token),
            "verdict": _verdict(ratio, gap),
        })
    return rows


def _verdict(ratio: float, gap: float | None) -> str:
    if ratio >= 1.0:
        return "SLOWER than dense"
    if gap is None or abs(gap) <= 10:
        return "as predicted"
    return "short of ideal" if gap > 0 else "better than ideal"


# --- machine ------------------------------------------------------------------------------------


def machine_info() -> dict:
    """What the numbers depend on: CPU, threads, memory, load when measured."""
    import torch

    cpu = platform.processor()
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": _load(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
            if hasattr(os, "sysconf") else None,
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    return info


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --- reports ------------------------------------------------------------------------------------


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def render_markdown(data: dict, title: str = "Latency") -> str:
    machine = data["machine"]
    lines = [f"# {title}", "",
             f"{data['build'] or ''} — provider {data['provider']}, {machine['cpu']} ({machine['cpu_count']} "
             f"cores, torch threads {machine['torch_threads']}), load average at start/end "
             f"{machine.get('load_average')} / {machine.get('load_average_end')}; onnxruntime "
             f"{data['versions'].get('onnxruntime', '-')}, torch {data['versions'].get('torch', '-')}.", "",
             "## Models (counted from their parameters)", "",
             "| variant | params | weight MB fp32 | streamed/forward MB fp32 | stored MB (quantized) "
             "| shortcut params | GFLOPs/token |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, cost in data["models"].items():
        stored = f"{cost['stored_bytes'] / 1e6:,.1f}" if cost.get("stored_bytes") is not None else "-"
        lines.append(f"| {name} | {cost['params']:,} | {cost['weight_bytes_fp32'] / 1e6:,.1f} | "
                     f"{cost['read_bytes_fp32'] / 1e6:,.1f} | {stored} | {cost['shortcut_params']:,} | "
                     f"{cost['flops_per_token'] / 1e9:.3f} |")
    lines += ["", "## Measured", "",
              "Prefill: time to first token (median of repeats). Decode: per-token latency over the timed steps; "
              "context = cached tokens before the first timed step. Peak memory: "
              f"{data['results'][0]['memory_kind'] if data['results'] else '-'} during that measurement.", "",
              "| backend | variant | phase | batch | prompt / context | p50 ms | p90 ms | p99 ms | tokens/s "
              "| peak MB |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["results"]:
        where = r["tokens"] if r["phase"] == "prefill" else r["context"]
        lines.append(f"| {r['backend']} | {r['variant']} | {r['phase']} | {r['batch']} | {where} | "
                     f"{_fmt(r['p50_ms'], 2)} | {_fmt(r['p90_ms'], 2)} | {_fmt(r['p99_ms'], 2)} | "
                     f"{_fmt(r['tokens_per_s'])} | {_fmt(r['peak_memory_mb'], 0)} |")
    if data["comparisons"]:
        lines += ["", "## Ideal vs measured (variant / dense; < 1 is faster)", "",
                  "Ideal: bytes streamed per step (weights + KV) for decode, FLOPs for prefill. "
                  "gap = measured ratio / ideal ratio − 1.", "",
                  "| backend | variant | phase | batch | prompt / context | weight bytes | FLOPs/token | ideal "
                  "| measured | "
                  "speedup | gap | verdict |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for c in data["comparisons"]:
            verdict = f"**{c['verdict']}**" if c["verdict"] != "as predicted" else c["verdict"]
            where = c["tokens"] if c["phase"] == "prefill" else c["context"]
            lines.append(f"| {c['backend']} | {c['variant']} | {c['phase']} | {c['batch']} | {where} | "
                         f"{_fmt(c['weight_bytes_ratio'], 3)} | {_fmt(c['flops_ratio'], 3)} | "
                         f"{_fmt(c['ideal_ratio'], 3)} | {_fmt(c['latency_ratio'], 3)} | {_fmt(c['speedup'], 2)}x | "
                         f"{_fmt(c['gap_pct'], 1)} % | {verdict} |")
    if data["skipped"]:
        lines += ["", "## Not measured", ""] + [f"- {s['backend']} ({s['variant']}): {s['reason']}"
                                               for s in data["skipped"]]
    return "\n".join(lines) + "\n"


def write_report(data: dict, out_dir: str | Path, title: str = "Latency") -> dict[str, Path]:
    """latency.json, latency.md and the PNG plots, published together (atomic dir)."""
    from toolchain.core.fileio import atomic_dir, write_json, write_text

    from toolchain.analysis import bench_plots

    out_dir = Path(out_dir)
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / JSON_FILE).is_file()):
        raise OutputPathError(f"--out {out_dir} exists and is not a latency report dir; choose a new directory")
    with atomic_dir(out_dir, overwrite=True) as tmp:
        write_json(tmp / JSON_FILE, data)
        write_text(tmp / MARKDOWN_FILE, render_markdown(data, title))
        plots = bench_plots.plot_all(data, tmp)
    names = [JSON_FILE, MARKDOWN_FILE, *(p.name for p in plots)]
    return {name: out_dir / name for name in names}


def new_report(build: str | None, provider: str, dtype: str, config: BenchConfig) -> dict:
    """The JSON skeleton, keys in TOP_KEYS order."""
    import datetime

    import torch

    gpu = torch.cuda.get_device_name() if provider != "cpu" and torch.cuda.is_available() else None
    return {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "build": build, "provider": provider, "gpu": gpu, "dtype": dtype, "n_gpus": 1,
            "machine": machine_info(), "versions": library_versions(), "config": asdict(config), "models": {},
            "results": [], "comparisons": [], "skipped": []}


def finish_report(data: dict, costs: dict[str, ModelCost]) -> dict:
    data["models"] = {name: cost.as_dict() for name, cost in costs.items()}
    data["comparisons"] = compare(data["results"], costs)
    data["machine"]["load_average_end"] = _load()
    return data


# --- a build ------------------------------------------------------------------------------------


@dataclass
class Backend:
    """One thing to measure: `open()` builds the session when its turn comes (one model in memory
    at a time), `close()` frees what it holds."""

    name: str
    variant: str
    dtype: str
    open: Callable[[], Session]
    cost: Callable[[], ModelCost]
    close: Callable[[], None] = field(default=lambda: None)
    optional: bool = False  # e.g. TensorRT: a machine that cannot run it records why and goes on


@dataclass
class BenchResult:
    data: dict
    paths: dict[str, Path]

    @property
    def json_path(self) -> Path:
        return self.paths[JSON_FILE]

    @property
    def markdown_path(self) -> Path:
        return self.paths[MARKDOWN_FILE]


def bench_build(build_dir: str | Path, out_dir: str | Path, provider: str = "cpu",
                prompts: Iterable[int] | str | None = None, batches: Iterable[int] | str | None = None,
                steps: int = 20, warmup: int = 3, repeats: int = 3, context: int = 128,
                max_prompt: int | None = None, dense: bool = True, torch_only: bool = False,
                threads: int | None = None, quantized: bool | None = None,
                progress: Progress | None = None) -> BenchResult:
    """Measure the build's sliced model (torch eager on sliced/, ORT on onnx/, the int4/int8 graph in
    quantized/ on ORT, TensorRT when available) and, unless `dense=False`, its dense source on the same
    backends (the dense ONNX is exported to a temp dir with the build's export settings). `quantized`:
    None measures quantized/ when the build has one. Writes the report into `out_dir`."""
    build = Path(build_dir).expanduser()
    provider = provider.lower()
    provider_name(provider)  # unknown or not-installed providers fail before anything loads
    config = BenchConfig(prompts=parse_ints(prompts, "prompts") or DEFAULT_PROMPTS,
                         batches=parse_ints(batches, "batches") or DEFAULT_BATCHES, steps=steps, warmup=warmup,
                         repeats=repeats, context=context, max_prompt=max_prompt, threads=threads)
    config.validate()
    layout = _check_build(build, torch_only)
    sliced_config = json.loads((build / "sliced" / "config.json").read_text())
    max_positions = sliced_config.get("max_position_embeddings")
    data = new_report(str(build), provider, layout["dtype"], config)
    backends = _build_backends(build, layout, provider, dense, torch_only, threads, data["skipped"],
                               _quantized_dir(build, quantized) if not torch_only else None)

    per_backend = len(config.prompt_lengths(max_positions)) + len(config.batches)
    total, done = per_backend * len(backends), 0

    def tick() -> None:
        nonlocal done
        done += 1
        progress and progress(done, total)

    progress and progress(0, total)
    costs: dict[str, ModelCost] = {}
    with torch_threads(threads):
        for backend in backends:
            start = done
            try:
                session = backend.open()
                if backend.variant not in costs:
                    costs[backend.variant] = backend.cost()
                data["results"] += measure_session(session, config, backend.variant, backend.dtype, max_positions,
                                                   costs[backend.variant].as_result_model(backend.dtype), tick)
            except ToolchainError as err:
                if not backend.optional:
                    raise
                data["skipped"].append({"backend": backend.name, "variant": backend.variant, "reason": str(err)})
                data["results"] = [r for r in data["results"] if (r["backend"], r["variant"]) !=
                                   (backend.name, backend.variant)]
                done = start + per_backend
                progress and progress(done, total)
            finally:
                session = None
                backend.close()
                gc.collect()
    finish_report(data, costs)
    return BenchResult(data, write_report(data, out_dir, title=f"Latency: {build.name}"))


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run with `threads` torch intra-op threads, restoring the previous count afterwards."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_build(build: Path, torch_only: bool) -> dict:
    if not (build / "sliced" / "config.json").is_file():
        raise ArtifactError(f"{build} is not a build dir (no sliced/config.json); pass a directory made by "
                            "`toolchain build`")
    onnx_dir = build / "onnx"
    if torch_only:
        return {"onnx": None, "dtype": "fp32", "optimize": True, "exporter": "dynamo"}
    if not (onnx_dir / "model.onnx").is_file():
        raise ArtifactError(f"{build} has no onnx/ export; run `toolchain build --target onnx` on it first, or "
                            "bench the torch model only with --torch-only")
    export = {}
    if (onnx_dir / "export_config.json").is_file():
        export = json.loads((onnx_dir / "export_config.json").read_text())
    # the dense export mirrors the build's, so both graphs get the same precision, fusions and exporter
    # ("graph": fast | basic | none; older exports only record whether ORT fused them)
    return {"onnx": onnx_dir, "dtype": export.get("dtype", "fp32"),
            "optimize": export.get("graph", export.get("optimized", True)),
            "exporter": export.get("exporter", "dynamo")}


def _torch_device(provider: str) -> str:
    import torch

    return "cuda" if provider != "cpu" and torch.cuda.is_available() else "cpu"


def _quantized_dir(build: Path, wanted: bool | None) -> Path | None:
    path = build / "quantized"
    present = (path / "model.onnx").is_file() and (path / "export_config.json").is_file()
    if wanted and not present:
        raise ArtifactError(f"{build} has no quantized/ graph; build it with `toolchain build ... --quantize int4`")
    return path if present and wanted is not False else None


def graph_weight_bytes(path: str | Path) -> tuple[int, int]:
    """(all initializer bytes, bytes a forward reads) of an ONNX graph: tables that only feed Gather
    (embedding lookups) are not read whole."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    total = read = 0
    for tensor in graph.initializer:
        location = {entry.key: entry.value for entry in tensor.external_data}
        size = int(location.get("length", 0)) if location else len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
        total += size
        read += 0 if readers.get(tensor.name) == {"Gather"} else size
    return total, read


def _build_backends(build: Path, layout: dict, provider: str, dense: bool, torch_only: bool,
                    threads: int | None, skipped: list, quantized: Path | None = None) -> list[Backend]:
    """sliced torch, sliced ORT, [sliced int4/int8 ORT], [sliced TensorRT], then dense torch and dense
    ORT (exported to a temp dir), in that order so at most one model is resident at a time."""
    device = _torch_device(provider)
    holder: dict = {}

    def load_sliced():
        from runtime.loading import load_causal_lm

        model, _ = load_causal_lm(build / "sliced")
        holder["sliced"] = model.to(device)
        return TorchSession(holder["sliced"], name=f"torch-{device}")

    def sliced_cost():
        # counted once: the int4/int8 and TensorRT variants reuse it instead of reloading sliced/
        if "sliced_cost" not in holder:
            if "sliced" in holder:
                holder["sliced_cost"] = model_cost(holder["sliced"])
            else:
                from runtime.loading import load_causal_lm

                holder["sliced_cost"] = model_cost(load_causal_lm(build / "sliced")[0])
        return holder["sliced_cost"]

    backends = [Backend(f"torch-{device}", "sliced", "fp32", load_sliced, sliced_cost,
                        lambda: holder.pop("sliced", None))]
    if not torch_only:
        backends.append(Backend(f"ort-{provider}", "sliced", layout["dtype"],
                                lambda: OrtSession(layout["onnx"], provider, threads=threads), sliced_cost))
        if quantized is not None:
            mode = json.loads((quantized / "export_config.json").read_text())["quantization"]["mode"]

            def quantized_cost():
                stored, read = graph_weight_bytes(quantized / "model.onnx")
                return replace(sliced_cost(), stored_bytes=stored, stored_read_bytes=read)

            backends.append(Backend(f"ort-{provider}", f"sliced-{mode}", mode,
                                    lambda: OrtSession(quantized, provider, threads=threads), quantized_cost))
        trt = _trt_backend(build, skipped)
        if trt is not None:
            trt.cost = sliced_cost
            backends.append(trt)
    if not dense:
        skipped.append({"backend": "all", "variant": "dense", "reason": "--no-dense"})
        return backends

    scratch: dict = {}

    def load_dense():
        holder["dense"] = load_dense_model(build).to(device)
        return TorchSession(holder["dense"], name=f"torch-{device}")

    def dense_cost():
        if "dense" not in holder:
            holder["dense"] = load_dense_model(build)
        return model_cost(holder["dense"])

    def open_dense_onnx():
        from exporters.onnx import ExportOptions, export_onnx

        model = holder.get("dense") or load_dense_model(build)
        holder["dense_cost"] = model_cost(model)
        scratch["dir"] = tempfile.TemporaryDirectory(prefix="toolchain-dense-onnx-")
        out = Path(scratch["dir"].name) / "onnx"
        export_onnx(model.float().cpu(), out, ExportOptions(dtype=layout["dtype"], optimize=layout["optimize"],
                                                            exporter=layout["exporter"]))
        holder.pop("dense", None)
        del model
        gc.collect()
        return OrtSession(out, provider, threads=threads)

    def close_dense_onnx():
        if "dir" in scratch:
            scratch.pop("dir").cleanup()

    backends.append(Backend(f"torch-{device}", "dense", "fp32", load_dense, dense_cost))
    if not torch_only:
        backends.append(Backend(f"ort-{provider}", "dense", layout["dtype"], open_dense_onnx,
                                lambda: holder.get("dense_cost") or dense_cost(), close_dense_onnx))
    return backends


def load_dense_model(build: Path):
    """The build's source model, mapped onto the canonical model the same way compress did."""
    from toolchain.model.adapters import to_canonical
    from toolchain.data.sources import load_hf_model, resolve_model

    report_path = build / "sliced" / "compression_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    options = report.get("options", {})
    source = options.get("model") or json.loads((build / "sliced" / "config.json").read_text()).get("source_model")
    if not source:
        raise ArtifactError(f"{build}/sliced names no source model (compression_report.json options.model or "
                            "config.json source_model); bench with --no-dense")
    try:
        hf_model, _ = load_hf_model(resolve_model(source))
    except ToolchainError as err:
        raise type(err)(f"dense source {source!r}: {err}; or bench the sliced model alone with --no-dense") from err
    return to_canonical(hf_model, source_model=source, keep_tie=options.get("tie", "slice") != "untie").eval()


def _trt_backend(build: Path, skipped: list) -> Backend | None:
    """TensorRT on the build's trt/ bundle through runtime/trt_session.py, when TensorRT imports;
    a bundle without an engine for this GPU is recorded as skipped, not an error."""
    if not (Path(__file__).parent / "trt_session.py").is_file():
        return None
    if not (build / "trt").is_dir():
        skipped.append({"backend": "tensorrt", "variant": "sliced",
                        "reason": "no trt/ bundle; build with `toolchain build --target trt`"})
        return None
    try:
        import tensorrt  # noqa: F401

        from runtime.trt_session import open_trt_session
    except ImportError as err:
        skipped.append({"backend": "tensorrt", "variant": "sliced", "reason": f"TensorRT is not importable ({err})"})
        return None
    return Backend("tensorrt", "sliced", "fp16", lambda: open_trt_session(build / "trt"), lambda: None,
                   optional=True)


__all__ = ["BenchConfig", "BenchResult", "ModelCost", "PeakMemory", "bench_build", "compare", "measure_session",
           "model_cost", "percentiles", "render_markdown", "write_report"]


# --- where the time goes (ORT) ------------------------------------------------------------------

_MATMULS = ("MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "MatMulInteger")
_ELEMENT_BYTES = {"float": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}


def profile_ort_decode(path: str | Path, batch: int = 1, context: int = 128, steps: int = 10, warmup: int = 3,
                       threads: int | None = None, provider: str = "cpu", top: int = 15) -> dict:
    """ORT's own profiler over `steps` decode steps: time per op type, and for matmuls per weight
    shape with the bandwidth it reached (weight bytes / time), to show where a slice loses time."""
    import onnxruntime as ort

    session = OrtSession(path, provider, threads=threads)
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "decode")
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        # OrtSession has no hook for SessionOptions: swap in a profiled session over the same file
        session.session = ort.InferenceSession(str(session.path), options, providers=[session.provider])
        times = time_decode(session, batch, context, warmup, steps, np.random.default_rng(0))
        events = json.loads(Path(session.session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-steps:]
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
             and any(lo <= e["ts"] <= hi for lo, hi in runs)]
    groups: dict[tuple[str, str], dict] = {}
    for e in nodes:
        op = e.get("args", {}).get("op_name", "?")
        weight, nbytes = "", 0
        if op in _MATMULS:  # initializers are not listed as inputs: the weight is K (input) × N (output)
            inputs, outputs = e["args"].get("input_type_shape") or [], e["args"].get("output_type_shape") or []
            if len(inputs) == 1 and outputs:
                (dtype, x), = inputs[0].items()
                (_, y), = outputs[0].items()
                weight = f"{x[-1]}×{y[-1]}"
                nbytes = x[-1] * y[-1] * _ELEMENT_BYTES.get(dtype, 4)
        group = groups.setdefault((op, weight), {"us": 0, "count": 0, "bytes": 0})
        group["us"] += e["dur"]
        group["count"] += 1
        group["bytes"] += nbytes
    total_us = sum(g["us"] for g in groups.values()) or 1
    rows = [{"op": op, "weight": weight, "ms_per_step": g["us"] / steps / 1e3, "share": g["us"] / total_us,
             "nodes": g["count"] // steps,
             "gb_per_s": round(g["bytes"] / (g["us"] * 1e3), 1) if g["bytes"] and g["us"] else None}
            for (op, weight), g in groups.items()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    by_op: dict[str, float] = {}
    for r in rows:
        by_op[r["op"]] = by_op.get(r["op"], 0.0) + r["ms_per_step"]
    return {"batch": batch, "context": context + warmup, "steps": steps, "wall_ms_per_step": float(np.mean(times)),
            "ms_per_step": total_us / steps / 1e3,
            "matmul_share": sum(r["share"] for r in rows if r["op"] in _MATMULS),
            "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])), "top": rows[:top]}
