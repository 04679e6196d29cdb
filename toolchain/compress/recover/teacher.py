"""Where the distillation teacher lives, and what the loss reads from it.

Two placements:
- `resident`: the teacher sits next to the student on the training device and scores every
  micro-batch as it comes (exact KL over the whole vocabulary).
- `topk`: before training, the teacher scores every micro-batch the run will use, keeps the top-k
  log-probabilities per token plus the log of the mass left over, and is freed; the loss then reads
  that cache. This is what a GPU whose memory cannot hold both models runs. The teacher computes
  the cache on the training device when it fits there alone, else on the CPU.

`auto` picks `resident` when the estimate of both models plus training state fits in the device's
free memory (with headroom), else `topk`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from toolchain.compress.recover.data import TrainWindows
from toolchain.compress.recover.distill import log_rest
from toolchain.core.fileio import atomic_file

HEADROOM = 0.85  # share of the free memory the estimate may use: allocator slack, fragmentation
CACHE = "teacher_topk.safetensors"


@dataclass(frozen=True)
class Placement:
    mode: str  # resident | topk
    teacher_device: str
    reason: str
    estimate_bytes: int  # student + teacher + training state, as estimated
    free_bytes: int | None  # what the device had free when the choice was made (None: unknown)


@dataclass
class TopK:
    """One micro-batch's teacher targets: top-k log-probs, their token ids, and log(rest mass)."""

    values: torch.Tensor  # [batch, seq, k] float32
    indices: torch.Tensor  # [batch, seq, k] int64
    rest: torch.Tensor  # [batch, seq] float32, -inf when k covers the vocabulary


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def free_bytes(device: str) -> int | None:
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def training_bytes(student_bytes: int, full: bool, tokens: int, hidden: int, layers: int, vocab: int) -> int:
    """A coarse upper estimate: weights (+ gradients and two AdamW moments when every weight trains)
    and the activations kept for backward of one micro-batch (≈ 24 floats per hidden unit per layer,
    and about four copies of the logits: logits, log-softmax, their gradients)."""
    weights = student_bytes * (4 if full else 1)
    activations = tokens * (24 * hidden * layers + 4 * vocab) * 4
    return weights + activations


def choose(mode: str, device: str, student_need: int, teacher_bytes: int, teacher_logits: int,
           free: int | None) -> Placement:
    """The placement for `--recover-teacher MODE` given the memory estimates (bytes)."""
    both = student_need + teacher_bytes + teacher_logits
    alone_fits = free is None or teacher_bytes + 2 * teacher_logits <= HEADROOM * free
    cache_device = device if alone_fits else "cpu"
    if mode == "resident":
        return Placement("resident", device, "asked for (--recover-teacher resident)", both, free)
    if mode == "topk":
        return Placement("topk", cache_device, "asked for (--recover-teacher topk)", both, free)
    if free is None or both <= HEADROOM * free:
        return Placement("resident", device, "free memory unknown" if free is None else "both models fit in the "
                         "free memory", both, free)
    return Placement("topk", cache_device, "both models do not fit in the free memory", both, free)


def place(mode: str, device: str, student, teacher, full: bool, batch: int, seqlen: int) -> Placement:
    config = student.config
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    tokens = batch * seqlen
    need = training_bytes(parameter_bytes(student), full, tokens, hidden, layers, vocab)
    return choose(mode, device, need, parameter_bytes(teacher), tokens * vocab * 4, free_bytes(device))


@torch.no_grad()
def top_k_targets(teacher, ids: torch.Tensor, k: int) -> TopK:
    logprobs = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    values, indices = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return TopK(values, indices, log_rest(logprobs, indices))


def build_cache(teacher, data: TrainWindows, steps: int, accum: int, batch: int, k: int, device: str,
                state_dir: Path, key: str, progress: Callable | None = None) -> dict[tuple[int, int], TopK]:
    """Top-k targets of every micro-batch of the run, keyed (step, micro). Kept in the run's state dir,
    so a resumed run reads them back instead of loading the teacher's work again."""
    path = state_dir / CACHE
    if path.is_file():
        stored = load_file(str(path))
        if stored.get("key") is not None and bytes(stored["key"].tolist()).decode() == key:
            return _unflatten(stored, steps, accum)
    teacher.to(device)
    cache = {}
    for step in range(steps):
        for micro in range(accum):
            ids = data.micro_batch(step, micro, accum, batch).to(device)
            target = top_k_targets(teacher, ids, k)
            cache[step, micro] = TopK(target.values.cpu(), target.indices.cpu(), target.rest.cpu())
        if progress is not None:
            progress(step + 1, steps, f"teacher top-{k}: step {step + 1}/{steps}")
    state_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(_flatten(cache, key), str(tmp))
    return cache


def _flatten(cache: dict[tuple[int, int], TopK], key: str) -> dict[str, torch.Tensor]:
    out = {"key": torch.tensor(list(key.encode()), dtype=torch.uint8)}
    for (step, micro), target in cache.items():
        for name, tensor in asdict(target).items():
            out[f"{step}.{micro}.{name}"] = tensor.contiguous()
    return out


def _unflatten(stored: dict[str, torch.Tensor], steps: int, accum: int) -> dict[tuple[int, int], TopK]:
    return {(s, m): TopK(stored[f"{s}.{m}.values"], stored[f"{s}.{m}.indices"], stored[f"{s}.{m}.rest"])
            for s in range(steps) for m in range(accum)}


def cache_bytes(cache: dict[tuple[int, int], TopK]) -> int:
    return sum(t.numel() * t.element_size() for target in cache.values() for t in asdict(target).values())
