"""Defaults of the recovery options left unset, by device.

CUDA gets the SliceGPT paper's recovery fine-tuning recipe (sequence length 1024, lr 2e-4, evaluation
every 16 steps); the CPU gets a budget that finishes in minutes on a small model: shorter windows,
fewer steps, and a higher LoRA learning rate because a few dozen steps at 2e-4 barely move a rank-32
adapter scaled by alpha/rank.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from toolchain.compress.options import RecoverOptions
from toolchain.core.errors import InvalidOptionError

CUDA = dict(recover_steps=200, recover_seqlen=1024, recover_batch=4, recover_grad_accum=4, recover_eval_every=16,
            recover_eval_windows=32)
CPU = dict(recover_steps=60, recover_seqlen=256, recover_batch=4, recover_grad_accum=1, recover_eval_every=10,
           recover_eval_windows=4)
BETAS = (0.9, 0.95)


@dataclass(frozen=True)
class Resolved:
    """The options with every default filled in, and the device they run on."""

    options: RecoverOptions
    device: str


def resolve(options: RecoverOptions, device: str) -> Resolved:
    if options.recover is None:
        raise InvalidOptionError("no recovery method; pass --recover lora, distill or full-distill")
    table = CUDA if device.startswith("cuda") else CPU
    filled = {name: value for name, value in table.items() if getattr(options, name) is None}
    if options.recover_lr is None:
        filled["recover_lr"] = default_lr(options.recover, device)
    return Resolved(replace(options, **filled), device)


def default_lr(method: str, device: str) -> float:
    if device.startswith("cuda"):
        return 2e-4
    return 1e-4 if method == "full-distill" else 1e-3
