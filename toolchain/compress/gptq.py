"""GPTQ on the canonical model: every selected nn.Linear gets MatMulNBits codes that compensate their
own rounding error against the inputs that linear sees on calibration text.

The model is walked as a chain of stages — the embedding (its `embed_proj`), each decoder layer, the
final norm with `head_proj`, and `lm_head` — each mapping the calibration state it receives to the
next one. Per stage: the inputs of its selected linears are gathered with forward hooks (their
Hessians, padding excluded), each linear is solved by GPTQ, and the stage is run again with the
dequantized weights in place to produce the next stage's inputs. So the inputs of layer l are those
of the model whose layers 0..l−1 are already quantized, and each layer compensates the error that
reaches it. Within a stage all Hessians come from one pass over the original weights.

The original weights are put back right after each stage's second pass (in place, so a tied token
table and LM head stay one tensor): the model is unchanged when `gptq_quantize` returns.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from toolchain.core.blockquant import BlockQuantized
from toolchain.core.errors import InvalidOptionError
from toolchain.model.modeling import attention_bias
from toolchain.compress.gptq_solver import gptq_linear, inverse_cholesky
from toolchain.compress.hessian import HessianAccumulator


@dataclass
class Batch:
    """One calibration batch's mask and what every layer reads besides the residual."""

    mask: torch.Tensor
    positions: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None
    bias: torch.Tensor


@dataclass
class Stage:
    linears: list[str]  # canonical module names of the nn.Linear layers this stage applies
    # stage input → next stage's input; None for the last stage, whose linears read its input as is
    run: Callable[[torch.Tensor, Batch], torch.Tensor] | None


def linear_names(model) -> list[str]:
    """Canonical names of every nn.Linear of the model, in model order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def model_stages(model) -> list[Stage]:
    """The model as a chain of stages, embedding first, LM head last."""
    stages = [Stage(["embed_proj"] if model.embed_proj is not None else [],
                    lambda ids, batch: model.hidden_input(ids, batch.positions))]
    for index, layer in enumerate(model.layers):
        names = [f"layers.{index}.{name}" for name, module in layer.named_modules() if isinstance(module, nn.Linear)]
        stages.append(Stage(names, lambda h, batch, layer=layer: layer(h, batch.rope, batch.bias, None)))

    def head_input(h, batch):
        h = model.norm(h)
        return h if model.head_proj is None else model.head_proj(h)

    stages.append(Stage(["head_proj"] if model.head_proj is not None else [], head_input))
    # the LM head's input is the state itself: no need to form the [batch, seq, vocab] logits
    stages.append(Stage(["lm_head"], None))
    return stages


def calibration_batches(model, input_ids, attention_mask, batch_size: int):
    """(token ids, Batch) per batch, on the model's device; positions follow the mask (left padding)."""
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    for start in range(0, len(input_ids), batch_size):
        ids = input_ids[start:start + batch_size].to(device)
        mask = attention_mask[start:start + batch_size].to(device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        bias = attention_bias(mask, mask.shape[1], dtype, model.config.sliding_window)
        yield ids, Batch(mask, positions, model.rope(positions, dtype), bias)


def selected_linears(model, modules) -> list[str]:
    every = linear_names(model)
    if modules is None:
        return every
    wanted = list(modules)
    unknown = [name for name in wanted if name not in every]
    if unknown:
        raise InvalidOptionError(f"not nn.Linear modules of this model: {', '.join(unknown)}; "
                                 f"choose among e.g. {', '.join(every[:4])}, …, {every[-1]}")
    return [name for name in every if name in wanted]


@contextlib.contextmanager
def dequantized(model, quantized: dict[str, BlockQuantized]):
    """The model with these linears' weights replaced by their dequantized codes; originals restored on exit."""
    saved = {}
    try:
        with torch.no_grad():
            for name, blocks in quantized.items():
                weight = model.get_submodule(name).weight
                saved[name] = weight.detach().clone()
                weight.copy_(torch.from_numpy(blocks.dequantize()).to(weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                model.get_submodule(name).weight.copy_(original)


def stage_hessians(model, stage: Stage, names: list[str], states, batches) -> dict[str, torch.Tensor]:
    """Input Hessians of `names` (linears of `stage`) over the calibration states. Linears that read
    the same tensor (q/k/v, gate/up) share one accumulator, so they get one Hessian object (and the
    caller can share its factorisation)."""
    device = states[0].device
    if stage.run is None:
        accumulator = HessianAccumulator(model.get_submodule(names[0]).in_features, device)
        for state, batch in zip(states, batches):
            accumulator.add(state, batch.mask)
        hessian = accumulator.hessian()
        return {name: hessian for name in names}
    owner: dict[str, HessianAccumulator] = {}  # linear → accumulator of the input it reads
    current: dict = {"batch": None, "seen": []}  # this batch's (input tensor, accumulator) pairs

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            shared = next((acc for t, acc in current["seen"] if t is x), None)
            if shared is None:
                shared = owner.get(name) or HessianAccumulator(x.shape[-1], device)
                shared.add(x, current["batch"].mask)
                current["seen"].append((x, shared))
            owner.setdefault(name, shared)
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        for state, batch in zip(states, batches):
            current["batch"], current["seen"] = batch, []
            stage.run(state, batch)
    finally:
        for handle in handles:
            handle.remove()
    hessians = {id(acc): acc.hessian() for acc in owner.values()}
    return {name: hessians[id(owner[name])] for name in names}


@torch.no_grad()
def gptq_quantize(model, input_ids, attention_mask, block_size: int = 32, bits: int = 4, damp: float = 0.01,
                  modules=None, progress=None, batch_size: int = 8) -> dict[str, BlockQuantized]:
    """MatMulNBits codes of the selected linears (default: every nn.Linear), by canonical module name.

    `input_ids`/`attention_mask` [n, seq]: calibration windows (mask 0 on padding, which never counts).
    `progress(done, total)` is called after each stage. The model's weights are left as they were.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise InvalidOptionError(f"block_size must be a positive integer, got {block_size!r}")
    if bits not in (2, 4, 8):
        raise InvalidOptionError(f"bits must be 2, 4 or 8 (MatMulNBits), got {bits!r}")
    selected = set(selected_linears(model, modules))
    was_training = model.training
    model.eval()
    stages = model_stages(model)
    last = max(i for i, stage in enumerate(stages) if selected & set(stage.linears)) if selected else -1
    pairs = list(calibration_batches(model, input_ids, attention_mask, batch_size))
    states, batches = [ids for ids, _ in pairs], [batch for _, batch in pairs]
    result: dict[str, BlockQuantized] = {}
    try:
        for index, stage in enumerate(stages[:last + 1]):
            names = [name for name in stage.linears if name in selected]
            solved = {}
            if names:
                hessians = stage_hessians(model, stage, names, states, batches)
                factors: dict[int, torch.Tensor] = {}  # one factorisation per distinct input
                for name in names:
                    hessian = hessians.pop(name)
                    if id(hessian) not in factors:
                        factors[id(hessian)] = inverse_cholesky(hessian, damp)
                    weight = model.get_submodule(name).weight
                    solved[name] = gptq_linear(weight, hessian, block_size, bits, damp, factors[id(hessian)])
                result.update(solved)
            if index < last:
                with dequantized(model, solved):
                    states = [stage.run(state, batch) for state, batch in zip(states, batches)]
            if progress is not None:
                progress(index + 1, last + 1)
    finally:
        model.train(was_training)
    return result
