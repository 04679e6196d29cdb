"""Rotate and slice the model position by position (see the package docstring for the method)."""

from __future__ import annotations

from pathlib import Path

import torch

from toolchain.core.errors import InvalidOptionError
from toolchain.model.modeling import SlicedForCausalLM
from toolchain.compress import budget, rotation
from toolchain.compress.options import SliceOptions
from toolchain.compress.slicegpt.calibration import Calibration, embed_calibration, next_residual
from toolchain.compress.slicegpt.statistics import (DenseStats, covariance, dense_statistics, group_losses, joint_tie,
                                                    needs_dense_statistics, normalised_sum, principal_basis)
from toolchain.compress.slicegpt.weights import WeightStore
from toolchain.compress.slicegpt.widths import budget_problem, groups_for, resolve_widths


def choose_basis(options: SliceOptions, batches, masks, position: int, hidden: int) -> torch.Tensor:
    if options.rotation == "pca":
        return principal_basis(covariance(batches, masks), options.damping)
    if options.rotation == "random":
        return rotation.random_orthogonal(hidden, options.seed + position).to(batches[0].device)
    return torch.eye(hidden, dtype=torch.float64, device=batches[0].device)


def _group_basis(model, options, cal: Calibration, stats: DenseStats | None, groups, position) -> torch.Tensor:
    """Full D x D basis for the group starting at `position` (columns by decreasing variance)."""
    hidden, device = model.config.hidden_size, torch.device(options.device)
    if options.rotation != "pca":
        return choose_basis(options, [torch.zeros(1, device=device)], [], position, hidden)
    members = [p for p, g in enumerate(groups) if g == groups[position]]
    if options.share == "all":  # every member measured once on the dense model
        covs = [stats.covariances[p] for p in members]
    else:  # sequential: the residual entering the group, from the already-sliced model
        covs = [covariance(cal.residuals, cal.masks, f"residual position {position}")]
        if len(members) > 1:  # the layer's MLP position: same residual after the dense attention
            eye = torch.eye(hidden, dtype=torch.float64, device=device)
            after = (next_residual(model, position, cal.residuals[b], eye, *cal.batch(b)[1:]) for b in range(len(cal)))
            covs.append(covariance(after, cal.masks, f"residual position {position + 1}"))
    if 0 in members and joint_tie(model, options):
        covs.append(stats.head)
    return principal_basis(normalised_sum(covs), options.damping)


@torch.no_grad()
def slice_model(model: SlicedForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                options: SliceOptions, progress=None, weights: WeightStore | None = None,
                offload: Path | None = None) -> SlicedForCausalLM:
    """Rotate and slice `model` in place. `input_ids`/`attention_mask`: calibration windows [n, seq].
    `weights`: where the layers live (default: in the model; see toolchain/compress/streaming.py for a model
    read from its checkpoint layer by layer). `offload`: keep calibration activations as files there.
    `progress(done, total, note)` is called after each residual position ("SliceGPT layer 3/30")."""
    options.validate()
    weights = weights or WeightStore()
    config = model.config
    if any(config.shortcuts) or config.residual_widths != [config.hidden_size] * (config.num_positions + 1):
        raise InvalidOptionError("this model is already sliced; slice the original model instead")
    widths = resolve_widths(model, options)
    groups = groups_for(model, options)
    if options.tie == "project" and config.tie_word_embeddings:
        rotation.add_embedding_projection(model)
    model.eval()
    stats = None
    if needs_dense_statistics(model, options, widths):
        stats = dense_statistics(model, input_ids, attention_mask, options,
                                 positions=options.share == "all" or widths is None, head=joint_tie(model, options),
                                 weights=weights, offload=offload)
    if widths is None:  # spectrum budget
        problem = budget_problem(model, options, groups)
        losses = group_losses(stats, groups, model, options)
        plan = budget.plan_variance if options.budget == "variance" else budget.plan_global
        widths = plan(problem, options.target_params, losses)
    _rotate_and_slice(model, input_ids, attention_mask, options, widths, groups, stats, progress, weights, offload)
    weights.finish(model)
    config.compression = {
        "method": "slicegpt", "slice": options.slice, "rotation": options.rotation, "slice_head": options.slice_head,
        "tie": options.tie if config.tie_word_embeddings else "untied",
        "tie_basis": options.tie_basis if config.tie_word_embeddings and not config.embed_projection else None,
        "share": options.share, "target_params": options.target_params,
        "budget": options.budget if options.target_params is not None else None,
        "damping": options.damping, "widths": widths, "calibration_windows": int(len(input_ids)),
        "calibration_seqlen": int(input_ids.shape[1]), **options.extra,
    }
    return model


def _rotate_and_slice(model, input_ids, attention_mask, options, widths, groups, stats, progress,
                      weights: WeightStore, offload=None) -> None:
    """Position by position: basis, writers (the block before, or the embedding), shortcut, readers,
    then the calibration residual through the sliced position. A layer is opened at its first position
    and closed once the position after its last is done (that position rotates its writers)."""
    config = model.config
    device, dtype, hidden = torch.device(options.device), model.dtype, config.hidden_size
    final = config.num_positions
    # with one dense-measured basis for everything, no residual needs to be propagated
    propagate = not (options.share == "all" or options.rotation != "pca")
    if propagate:
        cal = embed_calibration(model, input_ids, attention_mask, options, weights, offload)
    else:
        weights.open_embedding(model, device)
        cal = Calibration(model, device)
    layer_of = [rotation._layer_and_kind(model, p)[0] for p in range(final)] + [None]
    open_layers: set[int] = set()

    def open_layer(index):
        if index is not None and index not in open_layers:
            weights.open_layer(model, index, device)
            open_layers.add(index)

    try:
        previous, full = None, None  # sliced basis of the position before; full basis of the current group
        for position in range(final + 1):
            width, index = widths[position], layer_of[position]
            new_group = position == 0 or groups[position] != groups[position - 1]
            if position == final and width == hidden and new_group:
                full = torch.eye(hidden, dtype=torch.float64, device=device)  # head stays in the original basis
            elif new_group:
                if groups.count(groups[position]) > 1 and options.share == "layer":
                    open_layer(index)  # the basis also sees the residual after this layer's dense attention
                full = _group_basis(model, options, cal, stats, groups, position)
            basis = full[:, :width]
            rotation.rotate_writers(model, position, basis)
            if previous is not None and new_group:
                rotation.set_shortcut(model, position - 1, previous.T @ basis, dtype)
            # the writers were the last part of the block before: close it, then open this position's
            if position == 0:
                weights.close_embedding(model, write=True)
            elif layer_of[position - 1] != index:
                weights.close_layer(model, layer_of[position - 1], write=True)
                open_layers.discard(layer_of[position - 1])
            open_layer(index)
            if position == final:  # after the last layer is out: the head may be the largest matrix
                weights.open_head(model, device)
            rotation.set_width(model, position, width)
            rotation.rotate_readers(model, position, basis)
            if position < final and propagate:
                for b in range(len(cal)):
                    sliced = (cal.residuals[b].to(torch.float64) @ basis).to(dtype)
                    cal.residuals[b] = next_residual(model, position, sliced, basis, *cal.batch(b)[1:])
            previous = basis
            if progress is not None:
                where = "head" if index is None else f"layer {index + 1}/{config.num_hidden_layers}"
                progress(position + 1, final + 1, f"SliceGPT {where}")
        weights.close_head(model, write=True)
    finally:
        cal.residuals.close()
