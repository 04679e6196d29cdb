"""SliceGPT: rotate each residual position onto the principal components of its calibration
activations, then keep the leading d_p components.

Calibration runs position by position through the already-sliced model: the residual entering
position p+1 is produced by blocks whose inputs were already rotated and sliced, so errors made
upstream are what later PCAs see. Only the calibration activations (kept in the model's dtype)
and the current layer are touched at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InvalidOptionError
from ..model import SlicedForCausalLM, attention_bias
from . import rotation

ROTATIONS = ("pca", "random", "identity")
TIE_MODES = ("slice", "project", "untie")  # "untie" is applied when mapping the HF model


@dataclass
class SliceOptions:
    slice: float = 0.0  # fraction of the hidden width removed
    widths: list[int] | None = None  # explicit residual widths, one per position (+ optional head)
    rotation: str = "pca"
    slice_head: bool = False  # also slice the final norm / LM head input
    tie: str = "slice"  # tied models: "slice" the token table, or keep it and "project" it
    round_to: int = 8
    damping: float = 0.01  # × mean of the covariance diagonal
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"
    extra: dict = field(default_factory=dict)


def uniform_widths(hidden: int, fraction: float, positions: int, slice_head: bool, round_to: int = 8) -> list[int]:
    """d = int((1-s)·D) rounded down to a multiple of `round_to` at every position."""
    if not 0.0 <= fraction < 1.0:
        raise InvalidOptionError(f"--slice must be in [0, 1), got {fraction}; e.g. --slice 0.3 removes 30% of the width")
    width = int((1.0 - fraction) * hidden) // round_to * round_to if fraction > 0 else hidden
    if width <= 0:
        raise InvalidOptionError(
            f"--slice {fraction} leaves no width: int((1-s)*{hidden}) rounded down to a multiple of {round_to} is 0; "
            "use a smaller --slice")
    return [width] * positions + [width if slice_head else hidden]


def resolve_widths(model: SlicedForCausalLM, options: SliceOptions) -> list[int]:
    config = model.config
    positions, hidden = config.num_positions, config.hidden_size
    if options.widths is None:
        return uniform_widths(hidden, options.slice, positions, options.slice_head, options.round_to)
    widths = list(options.widths)
    if len(widths) == positions:
        widths.append(widths[-1] if options.slice_head else hidden)
    if len(widths) != positions + 1:
        raise InvalidOptionError(
            f"--widths needs {positions} values (one per residual position: 2 per layer for sequential blocks, "
            f"1 for parallel) or {positions + 1} with the head; got {len(widths)}")
    if any(not 0 < w <= hidden for w in widths):
        raise InvalidOptionError(f"every width must be in 1..{hidden}; got {widths}")
    return widths


def principal_basis(covariance: torch.Tensor, damping: float) -> torch.Tensor:
    """Eigenvectors of the damped covariance, by descending eigenvalue (float64)."""
    damped = covariance + damping * covariance.diagonal().mean() * torch.eye(len(covariance), dtype=covariance.dtype,
                                                                              device=covariance.device)
    eigenvalues, eigenvectors = torch.linalg.eigh(damped)
    return eigenvectors[:, torch.argsort(eigenvalues, descending=True)]


def covariance(batches: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """Σ x xᵀ over the non-padding tokens, accumulated in float64."""
    dim = batches[0].shape[-1]
    total = torch.zeros(dim, dim, dtype=torch.float64, device=batches[0].device)
    for x, mask in zip(batches, masks):
        tokens = x[mask.bool()].to(torch.float64)
        total += tokens.T @ tokens
    return total


def choose_basis(options: SliceOptions, batches, masks, position: int, hidden: int) -> torch.Tensor:
    if options.rotation == "pca":
        return principal_basis(covariance(batches, masks), options.damping)
    if options.rotation == "random":
        return rotation.random_orthogonal(hidden, options.seed + position).to(batches[0].device)
    return torch.eye(hidden, dtype=torch.float64, device=batches[0].device)


@torch.no_grad()
def slice_model(model: SlicedForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                options: SliceOptions, progress=None) -> SlicedForCausalLM:
    """Rotate and slice `model` in place. `input_ids`/`attention_mask`: calibration windows [n, seq]."""
    if options.rotation not in ROTATIONS:
        raise InvalidOptionError(f"unknown rotation {options.rotation!r}; choose one of {', '.join(ROTATIONS)}")
    config = model.config
    if any(config.shortcuts) or config.residual_widths != [config.hidden_size] * (config.num_positions + 1):
        raise InvalidOptionError("this model is already sliced; slice the original model instead")
    widths = resolve_widths(model, options)
    if options.tie not in TIE_MODES:
        raise InvalidOptionError(f"unknown --tie {options.tie!r}; choose one of {', '.join(TIE_MODES)}")
    if options.tie == "project" and config.tie_word_embeddings:
        rotation.add_embedding_projection(model)
    device, dtype, hidden = torch.device(options.device), model.dtype, config.hidden_size
    final = config.num_positions
    model.eval()

    # Calibration batches stay on the compute device; embeddings run once.
    masks, residuals, ropes, biases = [], [], [], []
    embedding_modules = [model.embed_tokens, model.embed_positions, model.embed_proj]
    for module in embedding_modules:
        if module is not None:
            module.to(device)
    if model.rotary is not None:
        model.rotary.to(device)
    for start in range(0, len(input_ids), options.batch_size):
        ids = input_ids[start:start + options.batch_size].to(device)
        mask = attention_mask[start:start + options.batch_size].to(device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        masks.append(mask)
        residuals.append(model.hidden_input(ids, positions))
        ropes.append(model.rope(positions, dtype))
        biases.append(attention_bias(mask, ids.shape[1], dtype, config.sliding_window))

    previous = None  # sliced basis of the position before
    for position in range(final + 1):
        width = widths[position]
        if position == final and width == hidden:
            basis = torch.eye(hidden, dtype=torch.float64, device=device)  # head stays in the original basis
        else:
            basis = choose_basis(options, residuals, masks, position, hidden)[:, :width]
        rotation.rotate_writers(model, position, basis)
        if previous is not None:
            rotation.set_shortcut(model, position - 1, previous.T @ basis, dtype)
        rotation.set_width(model, position, width)
        if position < final:
            index, _ = rotation._layer_and_kind(model, position)
            model.layers[index].to(device)
        rotation.rotate_readers(model, position, basis)
        sliced = [(x.to(torch.float64) @ basis).to(dtype) for x in residuals]
        if position < final:
            residuals = [_next_residual(model, position, h, basis, rope, bias)
                         for h, rope, bias in zip(sliced, ropes, biases)]
            if rotation._layer_and_kind(model, position + 1)[0] != index:
                model.layers[index].to("cpu")
        previous = basis
        if progress is not None:
            progress(position + 1, final + 1)

    model.to("cpu")
    config.compression = {
        "method": "slicegpt", "slice": options.slice, "rotation": options.rotation, "slice_head": options.slice_head,
        "tie": options.tie if config.tie_word_embeddings else "untied",
        "damping": options.damping, "widths": widths, "calibration_windows": int(len(input_ids)),
        "calibration_seqlen": int(input_ids.shape[1]), **options.extra,
    }
    return model


def _next_residual(model, position, h, basis, rope, bias) -> torch.Tensor:
    """Residual at position+1 in the original basis: shortcut back to D dims plus the blocks at
    `position`, whose writers are not rotated yet."""
    index, kind = rotation._layer_and_kind(model, position)
    layer = model.layers[index]
    norm = rotation.norm_at(model, position)
    x = norm(h)
    carried = (h.to(torch.float64) @ basis.T).to(h.dtype)
    if kind == "attn":
        return carried + layer.attn(x, rope, bias, None)
    if kind == "mlp":
        return carried + layer.mlp(x)
    return carried + layer.attn(x, rope, bias, None) + layer.mlp(x)
