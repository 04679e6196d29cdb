"""Resumable training state, without pickles: tensors in safetensors (trainable weights, AdamW's
moments and step counts, the RNG state, the best weights so far) and everything else in JSON.

Each checkpoint is a directory `step-NNNNNN` written atomically; the previous one is removed only
after the new one is complete, so a kill at any moment leaves at least one whole checkpoint. A
checkpoint records the key of the run that wrote it (options and input hashes): a run with another
key starts from scratch instead of resuming someone else's state.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from toolchain.core.fileio import atomic_dir

TENSORS = "tensors.safetensors"
STATE = "state.json"


@dataclass
class Snapshot:
    """What a checkpoint holds besides the optimizer."""

    step: int
    tokens: int
    curve: list[dict]
    best_step: int
    best_ppl: float
    best: dict[str, torch.Tensor] | None  # None: the best weights are the current ones
    extra: dict = field(default_factory=dict)


def _latest(state_dir: Path) -> Path | None:
    found = sorted(p for p in state_dir.glob("step-*") if (p / STATE).is_file()) if state_dir.is_dir() else []
    return found[-1] if found else None


def save(state_dir: Path, key: str, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
         snap: Snapshot) -> None:
    tensors = {f"param/{name}": p.detach().cpu().contiguous() for name, p in params.items()}
    index = {id(p): i for i, p in enumerate(params.values())}
    for p, state in optimizer.state.items():
        for slot, value in state.items():
            tensors[f"adam/{index[id(p)]}/{slot}"] = value.detach().cpu().contiguous()
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    for name, value in (snap.best or {}).items():
        tensors[f"best/{name}"] = value.cpu().contiguous()
    record = {"key": key, "step": snap.step, "tokens": snap.tokens, "curve": snap.curve, "best_step": snap.best_step,
              "best_ppl": snap.best_ppl, "best_is_current": snap.best is None, "extra": snap.extra}
    previous = _latest(state_dir)
    with atomic_dir(state_dir / f"step-{snap.step:06d}", overwrite=True) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(record, indent=1))
    if previous is not None and previous.name != f"step-{snap.step:06d}":
        shutil.rmtree(previous, ignore_errors=True)


def load(state_dir: Path, key: str, params: dict[str, torch.nn.Parameter],
         optimizer: torch.optim.Optimizer) -> Snapshot | None:
    """Restore the newest checkpoint of this run into `params` and `optimizer`; None when there is none
    (or it belongs to another run, which is then discarded)."""
    path = _latest(state_dir)
    if path is None:
        return None
    record = json.loads((path / STATE).read_text())
    if record.get("key") != key:
        shutil.rmtree(state_dir, ignore_errors=True)
        return None
    tensors = load_file(str(path / TENSORS))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
    groups = optimizer.state_dict()["param_groups"]
    state = {}
    for key_name, value in tensors.items():
        if key_name.startswith("adam/"):
            _, i, slot = key_name.split("/", 2)
            state.setdefault(int(i), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng/cpu"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    best = None if record["best_is_current"] else {
        name.removeprefix("best/"): value for name, value in tensors.items() if name.startswith("best/")}
    return Snapshot(record["step"], record["tokens"], record["curve"], record["best_step"], record["best_ppl"], best,
                    record.get("extra", {}))


def forget_other_run(state_dir: Path, key: str) -> None:
    """Remove the state of a different run (other options or inputs) before this run adds to it."""
    path = _latest(state_dir)
    if path is not None and json.loads((path / STATE).read_text()).get("key") != key:
        shutil.rmtree(state_dir, ignore_errors=True)


def discard(state_dir: Path) -> None:
    shutil.rmtree(state_dir, ignore_errors=True)
