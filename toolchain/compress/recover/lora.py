"""peft LoRA on explicitly named modules of the canonical model, merged back into plain Linear layers.

Names are checked against the model first: peft skips a name that matches nothing without a word,
which would train fewer modules than asked for. The token table is never a target: it is tied to
the head, and an adapter on one side would untie them.
"""

from __future__ import annotations

from torch import nn

from toolchain.compress.options import LORA_TARGETS
from toolchain.core.errors import InvalidOptionError


def linear_names(model: nn.Module) -> set[str]:
    """The last name component of every Linear layer (q_proj, attn_shortcut, head_proj, ...)."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def resolve_targets(model: nn.Module, requested: list[str] | None) -> list[str]:
    """The requested names, each checked to exist; by default the block projections the model has
    (a non-gated MLP has no gate_proj)."""
    present = linear_names(model)
    if requested is None:
        return [name for name in LORA_TARGETS if name in present]
    missing = [name for name in requested if name not in present]
    if missing:
        raise InvalidOptionError(f"--recover-targets {', '.join(missing)} matches no layer of this model; it has "
                                 f"{', '.join(sorted(present - {'lm_head'}))}")
    return list(requested)


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float):
    """The model wrapped by peft with LoRA on `targets` (every other weight frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    wrapped = get_peft_model(model, config)
    adapted = {name.rsplit(".", 1)[-1] for name, module in wrapped.named_modules() if hasattr(module, "lora_A")}
    missed = sorted(set(targets) - adapted)
    if missed:  # a name present as a Linear but not wrapped: a peft rule we did not expect
        raise InvalidOptionError(f"--recover-targets {', '.join(missed)}: peft wrapped no layer of that name")
    return wrapped


def merge(wrapped) -> nn.Module:
    """The base model with every adapter folded into its weights and no peft module left."""
    model = wrapped.merge_and_unload()
    leftovers = [name for name, module in model.named_modules() if "lora" in type(module).__module__.lower()
                 or hasattr(module, "lora_A")]
    if leftovers:
        raise RuntimeError(f"adapter modules survived the merge: {leftovers[:3]}")
    return model
