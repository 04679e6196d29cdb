"""The recovery training loop: micro-batches accumulated into AdamW steps, a learning-rate schedule,
gradient clipping, evaluation on held-out windows every N steps (keeping the best weights, the
untrained model included), and a checkpoint at every evaluation so a killed run resumes there.

Everything the next step depends on is either a function of the step number (training rows,
learning rate) or in the checkpoint (weights, AdamW state, RNG state), so a resumed run makes the
same bytes as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from toolchain.compress.recover import checkpoint
from toolchain.compress.recover.data import TrainWindows
from toolchain.compress.recover.defaults import BETAS
from toolchain.compress.recover.distill import kl_to_teacher, kl_to_top_k, next_token_loss
from toolchain.compress.recover.teacher import TopK
from toolchain.compress.options import RecoverOptions
from toolchain.core.errors import NonFiniteError
from toolchain.data.text import Windows


@dataclass
class Outcome:
    snapshot: checkpoint.Snapshot
    seconds: float  # this process's training time (a resumed run counts only its own part)
    resumed_from: int  # the step a checkpoint resumed from, 0 for a fresh run


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Multiplier of the peak learning rate for the update that makes step `step` + 1."""
    if schedule == "constant":
        return 1.0
    progress = step / steps
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress  # linear to zero, as the reference script's schedule


@torch.no_grad()
def held_out_ppl(model, windows: Windows, device: str) -> float:
    """exp(mean next-token NLL) over the held-out windows, one window at a time."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ids, _ in windows.batches(1):
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        total += float(next_token_loss(logits, ids).double()) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    model.train(was_training)
    return math.exp(total / count)


def make_loss(options: RecoverOptions, teacher_target: Callable | None) -> Callable:
    """(student model, ids, step, micro) → loss: next-token CE (lora), or KL to the teacher's targets
    (its logits, or its cached top-k) mixed with CE."""
    w = options.recover_ce_weight

    def loss(model, ids, step, micro):
        logits = model(input_ids=ids, use_cache=False).logits
        if teacher_target is None:
            return next_token_loss(logits, ids)
        with torch.no_grad():
            target = teacher_target(ids, step, micro)
        if isinstance(target, TopK):
            kl = kl_to_top_k(logits, target.values.to(logits.device), target.indices.to(logits.device),
                             target.rest.to(logits.device))
        else:
            kl = kl_to_teacher(logits, target)
        return kl if w == 0 else (1 - w) * kl + w * next_token_loss(logits, ids)

    return loss


def train(model, params: dict[str, torch.nn.Parameter], teacher_target, data: TrainWindows, held_out: Windows,
          options: RecoverOptions, device: str, state_dir: Path, key: str,
          progress: Callable | None = None) -> Outcome:
    o = options
    steps, accum, batch = o.recover_steps, o.recover_grad_accum, o.recover_batch
    decay = [p for n, p in params.items() if p.dim() >= 2]  # no weight decay on biases, as usual
    rest = [p for n, p in params.items() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.recover_weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=o.recover_lr, betas=BETAS)
    ordered = {n: p for n, p in params.items() if p.dim() >= 2} | {n: p for n, p in params.items() if p.dim() < 2}
    loss_fn = make_loss(o, teacher_target)
    snap = checkpoint.load(state_dir, key, ordered, optimizer)
    resumed_from = 0 if snap is None else snap.step
    if snap is None:
        ppl = held_out_ppl(model, held_out, device)
        snap = checkpoint.Snapshot(0, 0, [{"step": 0, "eval_ppl": ppl}], 0, ppl, None)
    best = _copy(ordered) if snap.best is None else snap.best
    start = time.perf_counter()
    model.train()
    _report(progress, snap, steps)
    while snap.step < steps:
        for group in optimizer.param_groups:
            group["lr"] = o.recover_lr * lr_factor(o.recover_schedule, snap.step, steps)
        total = 0.0
        for micro in range(accum):
            ids = data.micro_batch(snap.step, micro, accum, batch).to(device)
            loss = loss_fn(model, ids, snap.step, micro) / accum
            if not torch.isfinite(loss):
                raise NonFiniteError(f"the recovery loss is {float(loss.detach())} at step {snap.step + 1}; lower "
                                     f"--recover-lr (now {o.recover_lr:g}) or check the model for NaN/Inf weights")
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(list(ordered.values()), o.recover_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        snap.step += 1
        snap.tokens += accum * batch * data.rows.shape[1]
        point = {"step": snap.step, "loss": total, "lr": optimizer.param_groups[0]["lr"]}
        if snap.step % o.recover_eval_every == 0 or snap.step == steps:
            point["eval_ppl"] = held_out_ppl(model, held_out, device)
            if point["eval_ppl"] < snap.best_ppl:
                snap.best_step, snap.best_ppl = snap.step, point["eval_ppl"]
                best = _copy(ordered)
        snap.curve.append(point)
        if "eval_ppl" in point:
            snap.best = None if snap.best_step == snap.step else best
            checkpoint.save(state_dir, key, ordered, optimizer, snap)
        _report(progress, snap, steps)
    with torch.no_grad():  # the best evaluated weights, which may be the untrained ones
        for name, p in ordered.items():
            p.copy_(best[name])
    model.eval()
    return Outcome(snap, time.perf_counter() - start, resumed_from)


def _copy(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def _report(progress, snap: checkpoint.Snapshot, steps: int) -> None:
    if progress is None:
        return
    last = snap.curve[-1]
    evals = [p["eval_ppl"] for p in snap.curve if "eval_ppl" in p]
    loss = f"loss {last['loss']:.3f}" if "loss" in last else "loss -"
    progress(snap.step, steps, f"step {snap.step}/{steps} {loss} eval ppl {evals[-1]:.2f}")
