"""Timing primitives for any Session: time-to-first-token, per-token decode percentiles, throughput
and peak memory (`measure_session`; `measure_sessions` has several sessions take turns call by call),
the load drift that makes a run suspect, the machine the numbers depend on, what a model should cost
(ModelCost), and ORT's per-op profile of a decode step.

A build's benchmark (backends, dense source, report) is `toolchain.app.bench`; the report itself is
`toolchain.analysis.bench_report`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from toolchain.core.errors import InvalidOptionError

from runtime.generate import KVStream
from runtime.sessions import OrtSession, Session, TorchSession

DEFAULT_PROMPTS = (128, 512, 2048)
DEFAULT_BATCHES = (1, 8)
RESULT_KEYS = ("backend", "variant", "phase", "dtype", "batch", "tokens", "context", "samples", "measured_ms",
               "mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms", "tokens_per_s", "peak_memory_mb",
               "memory_kind", "model")

Progress = Callable[[int, int], None]

__all__ = ["BenchConfig", "Measured", "ModelCost", "PeakMemory", "graph_weight_bytes", "interleaved_decode",
           "load_average", "load_drift", "machine_info", "measure_session", "measure_sessions", "model_cost",
           "parse_ints", "percentiles", "profile_ort_decode", "time_decode", "time_prefill", "torch_threads"]


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
    # sessions measured together take turns call by call (dense, sliced, sliced, dense, ...), so load
    # drift on a shared machine hits them alike; False measures one after the other
    interleave: bool = True

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
    times = []
    for _ in range(repeats):
        stream = KVStream.prompt(session, np.ones_like(ids))
        start = time.perf_counter()
        logits = stream.run(ids)
        logits[:, -1].argmax(-1)
        times.append((time.perf_counter() - start) * 1e3)
    return times


class DecodeLoop:
    """Greedy decode one token per row per `step()`, from a synthetic cache of `context` tokens."""

    def __init__(self, session: Session, batch: int, context: int, rng: np.random.Generator):
        self.stream = KVStream.cached(session, _synthetic_past(session, batch, context, rng))
        self.next_ids = _ids(rng, session.vocab_size, batch, 1)

    def step(self) -> float:
        """Wall ms of one step, argmax included (the mask and positions are grown outside the timer)."""
        self.stream.extend()
        start = time.perf_counter()
        logits = self.stream.run(self.next_ids)
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
    names = list(loops)
    for step in range(warmup + steps):
        for name in (names[i] for i in _turns(len(names), step)):
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


@dataclass
class Measured:
    """One session of a group measured together (e.g. dense and sliced on one backend)."""

    variant: str
    session: Session
    dtype: str = "fp32"
    model: dict | None = None  # the result's `model` entry (ModelCost.as_result_model)


def measure_session(session: Session, config: BenchConfig, variant: str = "model", dtype: str = "fp32",
                    max_positions: int | None = None, model: dict | None = None,
                    tick: Callable[[], None] | None = None) -> list[dict]:
    """Prefill at every prompt length and decode at every batch size; one result dict each (RESULT_KEYS).

    Prefill: `measured_ms` is the median time-to-first-token, percentiles over `repeats`.
    Decode: `measured_ms` is the total of the `steps` timed steps (fit_efficiency's convention),
    percentiles are per step, `context` is the cache length before the first timed step.
    """
    return measure_sessions([Measured(variant, session, dtype, model)], config, max_positions, tick)


def measure_sessions(entries: list[Measured], config: BenchConfig, max_positions: int | None = None,
                     tick: Callable[[], None] | None = None) -> list[dict]:
    """`measure_session` for several sessions at once. With `config.interleave` they take turns: each
    prefill repeat and each decode step runs on every session in turn, the order reversed every round
    (A B, B A, ...), so both sides of a ratio see the same machine. Results come entry by entry, in
    `measure_session`'s order; `tick` is called once per entry and measurement. The peak memory of an
    interleaved group is the whole group's (every model is resident), its memory_kind says so."""
    config.validate()
    if not config.interleave and len(entries) > 1:
        return [r for e in entries for r in measure_sessions([e], config, max_positions, tick)]
    rng = np.random.default_rng(config.seed)
    on_cuda = any(isinstance(e.session, TorchSession) and e.session.device.type == "cuda" for e in entries)
    memory = PeakMemory("cuda" if on_cuda else "cpu")  # ORT's CUDA arena is invisible to torch: RSS there
    if len(entries) > 1:
        memory.kind += f" (all {len(entries)} models of the group resident)"
    for entry in entries:
        time_prefill(entry.session, 1, 8, 1, rng)  # first call: allocator, thread pool and kernel selection
    rows: dict[int, list[dict]] = {i: [] for i in range(len(entries))}

    def record(phase, batch, tokens, context, times: dict[int, list[float]], measured) -> None:
        peak = memory.peak_mb()
        for i, e in enumerate(entries):
            rows[i].append(_result(e.session.name, e.variant, phase, e.dtype, batch, tokens, context, times[i],
                                   measured(times[i]), memory, peak, e.model))
            tick and tick()

    for length in config.prompt_lengths(max_positions):
        memory.reset()
        times: dict[int, list[float]] = {i: [] for i in rows}
        for repeat in range(config.repeats):
            for i in _turns(len(entries), repeat):
                times[i] += time_prefill(entries[i].session, config.prefill_batch, length, 1, rng)
        record("prefill", config.prefill_batch, length, 0, times, lambda t: float(np.median(t)))
    context = config.decode_context(max_positions)
    for batch in config.batches:
        memory.reset()
        sessions = {i: e.session for i, e in enumerate(entries)}
        times = interleaved_decode(sessions, batch, context, config.warmup, config.steps,
                                   seed=int(rng.integers(2**31)))
        record("decode", batch, config.steps, context + config.warmup, times, lambda t: float(np.sum(t)))
    return [r for i in rows for r in rows[i]]


def _turns(count: int, round_: int) -> list[int]:
    """The order of one round: forwards on even rounds, backwards on odd ones."""
    return list(range(count)) if round_ % 2 == 0 else list(reversed(range(count)))


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
            "torch_threads": torch.get_num_threads(), "load_average": load_average(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
            if hasattr(os, "sysconf") else None,
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    return info


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def load_drift(samples: list[list[float] | None], cpu_count: int | None) -> str | None:
    """A warning when the 1-minute load average moved by a quarter of the cores (at least one core's
    worth) between the samples taken during a run, else None: then even interleaved ratios deserve a
    second run, and absolute times are not comparable with other runs."""
    loads = [s[0] for s in samples if s]
    if len(loads) < 2:
        return None
    spread, limit = max(loads) - min(loads), max(1.0, 0.25 * (cpu_count or 1))
    if spread < limit:
        return None
    return (f"the 1-minute load average moved from {min(loads):.2f} to {max(loads):.2f} during the run (more than "
            f"{limit:.2f} on {cpu_count or '?'} cores): other work competed for the machine; ratios of interleaved "
            "measurements still hold best, absolute times do not")


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
