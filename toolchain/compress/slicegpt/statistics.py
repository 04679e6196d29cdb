"""Calibration statistics: covariances of the residual stream, their principal bases, and the dense
model's statistics that a tied-table basis, a shared basis or a spectrum budget need first."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from toolchain.model.finite import count_non_finite, require_finite_statistics
from toolchain.model.modeling import SlicedForCausalLM
from toolchain.compress import budget, rotation
from toolchain.compress.options import SliceOptions
from toolchain.compress.slicegpt.calibration import embed_calibration
from toolchain.compress.slicegpt.weights import WeightStore


def principal_basis(covariance: torch.Tensor, damping: float) -> torch.Tensor:
    """Eigenvectors of the damped covariance, by descending eigenvalue (float64)."""
    damped = covariance + damping * covariance.diagonal().mean() * torch.eye(len(covariance), dtype=covariance.dtype,
                                                                              device=covariance.device)
    eigenvalues, eigenvectors = torch.linalg.eigh(damped)
    return eigenvectors[:, torch.argsort(eigenvalues, descending=True)]


def covariance(batches, masks: list[torch.Tensor], what: str = "a residual position") -> torch.Tensor:
    """Σ x xᵀ over the non-padding tokens, accumulated in float64 (`batches`: any iterable)."""
    total = None
    for x, mask in zip(batches, masks):
        tokens = x[mask.bool()].to(torch.float64)
        if total is None:
            total = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
        total += tokens.T @ tokens
    if total is not None and count_non_finite(total):
        require_finite_statistics(total, what, batches if hasattr(batches, "__getitem__") else None, masks)
    return total


@dataclass
class DenseStats:
    """Σ x̂ x̂ᵀ of the unit-normalised residual x̂ = h/‖h‖ per position 0..L of the dense model, and
    Σ y yᵀ of the tied head's input y = γ ⊙ norm(h_L) (None when there is no head projection);
    float64, padding excluded.

    Normalised tokens because the blocks read norm(h): in SmolLM2 the raw covariance of every
    position past layer 12 is >98 % one direction (the attention-sink token's massive activation),
    which would make explained-variance budgets and a shared basis see nothing else."""
    covariances: list[torch.Tensor]
    head: torch.Tensor | None


@torch.no_grad()
def dense_statistics(model: SlicedForCausalLM, input_ids, attention_mask, options: SliceOptions,
                     positions: bool = True, head: bool = True, weights: WeightStore | None = None,
                     offload: Path | None = None) -> DenseStats:
    """One pass of the (still dense) model over the calibration windows, layer by layer, with hooks on
    the residual positions (if `positions`) and on the head input (if `head` and there is a head_proj).
    `weights` says where the layers come from (default: the model's own, in memory)."""
    weights = weights or WeightStore()
    final = model.config.num_positions
    dim = model.config.hidden_size
    device = torch.device(options.device)
    zeros = lambda: torch.zeros(dim, dim, dtype=torch.float64, device=device)  # noqa: E731
    covs = [zeros() for _ in range(final + 1)] if positions else []
    head = zeros() if head and model.head_proj is not None else None
    current = {}

    def accumulate(target: torch.Tensor, x: torch.Tensor, unit: bool = False) -> None:
        tokens = x[current["mask"]].to(torch.float64)
        if unit:
            tokens = tokens / tokens.norm(dim=-1, keepdim=True).clamp(min=1e-30)
        target += tokens.T @ tokens

    def hook(module, position):
        return module.register_forward_pre_hook(lambda m, a: accumulate(covs[position], a[0], True))

    cal = embed_calibration(model, input_ids, attention_mask, options, weights, offload)
    weights.close_embedding(model, write=False)
    try:
        for index, layer in enumerate(model.layers):
            weights.open_layer(model, index, device)
            hooks = [hook(rotation.norm_at(model, p), p) for p in sorted(set(model.config.layer_positions(index)))
                     if p < len(covs)]
            try:
                for batch in range(len(cal)):
                    mask, rope, bias = cal.batch(batch)
                    current["mask"] = mask.bool()
                    cal.residuals[batch] = layer(cal.residuals[batch], rope, bias, None)
            finally:
                for handle in hooks:
                    handle.remove()
            weights.close_layer(model, index, write=False)
        weights.open_head(model, device, table=False)
        hooks = [hook(model.norm, final)] if positions else []
        if head is not None:
            hooks.append(model.head_proj.register_forward_hook(lambda m, a, out: accumulate(head, out)))
        try:
            for batch in range(len(cal)):
                current["mask"] = cal.masks[batch].bool()
                normed = model.norm(cal.residuals[batch])
                if model.head_proj is not None:
                    model.head_proj(normed)
        finally:
            for handle in hooks:
                handle.remove()
        weights.close_head(model, write=False)
    finally:
        cal.residuals.close()
    for position, cov in enumerate(covs):
        require_finite_statistics(cov, f"dense residual position {position}")
    if head is not None:
        require_finite_statistics(head, "the head input")
    return DenseStats(covs, head)


def normalised_sum(covariances: list[torch.Tensor]) -> torch.Tensor:
    """Σ C / tr(C): every stream weighs the same whatever its scale (the residual grows with depth).
    A single covariance is returned as is (its eigenvectors do not depend on scale)."""
    if len(covariances) == 1:
        return covariances[0]
    return sum(c / c.diagonal().sum().clamp(min=1e-30) for c in covariances)


def joint_tie(model: SlicedForCausalLM, options: SliceOptions) -> bool:
    """Does Q_0 also serve the head (a tied table that is sliced, with the joint basis)?"""
    config = model.config
    return (config.tie_word_embeddings and not config.embed_projection and model.head_proj is not None
            and options.tie_basis == "joint")


def needs_dense_statistics(model: SlicedForCausalLM, options: SliceOptions, widths) -> bool:
    if options.rotation != "pca":
        return False
    return joint_tie(model, options) or options.share == "all" or widths is None


def group_losses(stats: DenseStats, groups: list[int], model, options) -> dict[int, list[float]]:
    """Per group: variance (trace-normalised per member) left out at each width, from the dense model."""
    losses = {}
    for group in sorted(set(groups)):
        members = [p for p, g in enumerate(groups) if g == group]
        covs = [stats.covariances[p] for p in members]
        if 0 in members and joint_tie(model, options):
            covs.append(stats.head)
        covs = [c / c.diagonal().sum().clamp(min=1e-30) for c in covs]
        losses[group] = budget.unexplained(torch.linalg.eigvalsh(sum(covs)))
    return losses
