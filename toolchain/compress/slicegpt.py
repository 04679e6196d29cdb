"""SliceGPT: rotate each residual position onto the principal components of its calibration
activations, then keep the leading d_p components.

Calibration runs position by position through the already-sliced model: the residual entering
position p+1 is produced by blocks whose inputs were already rotated and sliced, so errors made
upstream are what later PCAs see. Only the calibration activations (kept in the model's dtype)
and the current layer are touched at a time.

Beyond the paper (issue 12, small tied models):
- tie basis: with a sliced tied table, Q_0 serves both the embedding and the head, so it comes from
  the PCA of the first residual stream *and* the head input (γ ⊙ final normed residual), each
  trace-normalised (`tie_basis="joint"`); "first" is the plain PCA of the first stream.
- shared rotations (`share`): positions of one group use one basis, so the residual carries between
  them as is (no shortcut matrix). "layer": a sequential block's attention and MLP positions; the
  basis comes from the residual entering the layer (sliced upstream, as above) and the same residual
  after the dense attention, trace-normalised and summed. "all": one basis for every position, from
  the trace-normalised covariances of all positions measured once on the dense model.
- budgets (`target_params`): widths chosen so the total parameter count fits (see budget.py),
  uniformly or from the dense model's PCA spectra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InvalidOptionError
from ..model import SlicedForCausalLM, attention_bias
from . import budget, rotation

ROTATIONS = ("pca", "random", "identity")
TIE_MODES = ("slice", "project", "untie")  # "untie" is applied when mapping the HF model
TIE_BASES = ("joint", "first")


@dataclass
class SliceOptions:
    slice: float = 0.0  # fraction of the hidden width removed
    widths: list[int] | None = None  # explicit residual widths, one per position (+ optional head)
    rotation: str = "pca"
    slice_head: bool = False  # also slice the final norm / LM head input
    tie: str = "slice"  # tied models: "slice" the token table, or keep it and "project" it
    tie_basis: str = "joint"  # sliced tied table: Q_0 from first stream + head input, or "first" only
    share: str = "none"  # none | layer | all: positions that share one rotation (no shortcut between)
    target_params: int | None = None  # total parameters to fit; overrides `slice`
    budget: str = "variance"  # with target_params: uniform | variance | global (see budget.py)
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


def groups_for(model: SlicedForCausalLM, options: SliceOptions) -> list[int]:
    config = model.config
    explicit_head = options.widths is not None and len(options.widths) == config.num_positions + 1
    slice_head = options.slice_head or (explicit_head and options.widths[-1] < config.hidden_size)
    return budget.position_groups(config, options.share, slice_head)


def resolve_widths(model: SlicedForCausalLM, options: SliceOptions) -> list[int] | None:
    """Residual widths from --slice or --widths (or a uniform --target-params). None when the widths
    come from a spectrum budget, which needs the dense model's statistics first."""
    config = model.config
    positions, hidden = config.num_positions, config.hidden_size
    groups = groups_for(model, options)
    if options.target_params is not None:
        if options.budget not in budget.BUDGETS:
            raise InvalidOptionError(f"unknown --budget {options.budget!r}; choose one of {', '.join(budget.BUDGETS)}")
        if options.budget == "uniform" or options.rotation != "pca":
            return budget.plan_uniform(budget_problem(model, options, groups), options.target_params)
        return None
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
    budget.check_group_widths(widths, groups)
    return widths


def budget_problem(model: SlicedForCausalLM, options: SliceOptions, groups: list[int]) -> budget.BudgetProblem:
    config = model.config
    project = options.tie == "project" and config.tie_word_embeddings
    size = budget.size_model(config, groups, project_table=project)
    fixed = {} if options.slice_head else {groups[-1]: config.hidden_size}
    return budget.BudgetProblem(size, groups, fixed, options.round_to)


def predicted_size(model: SlicedForCausalLM, options: SliceOptions) -> int | None:
    """Total parameters the sliced model will have (None if the widths need calibration first;
    a target budget then bounds it by `target_params`)."""
    widths = resolve_widths(model, options)
    if widths is None:
        return None
    return budget_problem(model, options, groups_for(model, options)).size.total(widths)


def validate_budget_options(target_params, target_ratio, share: str, tie_basis: str, budget_name: str) -> None:
    """Checks of the issue-12 options that need no model (run before anything is loaded)."""
    if target_params is not None and target_ratio is not None:
        raise InvalidOptionError("give --target-params or --target-ratio, not both")
    if target_params is not None and (not isinstance(target_params, int) or target_params < 1):
        raise InvalidOptionError(f"--target-params must be a positive integer, got {target_params!r}")
    if target_ratio is not None and (not isinstance(target_ratio, (int, float)) or not 0.0 < target_ratio <= 1.5):
        raise InvalidOptionError(f"--target-ratio must be a fraction of the input's parameters in (0, 1], "
                                 f"got {target_ratio!r}; e.g. --target-ratio 0.8 keeps 80%")
    for name, value, allowed in (("share", share, budget.SHARE_MODES), ("tie-basis", tie_basis, TIE_BASES),
                                 ("budget", budget_name, budget.BUDGETS)):
        if value not in allowed:
            raise InvalidOptionError(f"unknown --{name} {value!r}; choose one of {', '.join(allowed)}")


def check_plan_is_smaller(model: SlicedForCausalLM, options: SliceOptions, source_total: int,
                          allow_larger: bool) -> None:
    """Before calibrating: fail on impossible widths, and on a setting whose result cannot be smaller
    than the source (its tied parameter count), with the fix in the message."""
    if options.target_params is not None:
        resolve_widths(model, options)
        budget.ensure_smaller(options.target_params, source_total, allow_larger, "the requested target",
                              "Ask for a target below the input's size, e.g. --target-ratio 0.8")
        return
    total = predicted_size(model, options)
    what = f"--slice {options.slice}" if options.widths is None else "these --widths"
    what += f" with --tie {options.tie} --share {options.share}" if model.config.tie_word_embeddings or \
        options.tie == "untie" else f" with --share {options.share}"
    budget.ensure_smaller(total, source_total, allow_larger, what, _smaller_fix(model, options, source_total))


def _smaller_fix(model: SlicedForCausalLM, options: SliceOptions, source_total: int) -> str:
    """The least --slice that would be smaller with the other options unchanged, if any."""
    for step in range(1, 100):
        trial = SliceOptions(**{**options.__dict__, "slice": step / 100, "widths": None})
        if predicted_size(model, trial) < source_total:
            hint = f"Use --slice {step / 100:.2f} or more, or --target-ratio 0.9"
            if model.config.tie_word_embeddings or options.tie == "untie":
                hint += " (--tie slice keeps one token table; --share layer halves the shortcuts)"
            return hint
    return "No --slice makes it smaller; use --tie slice, --share layer or --target-ratio"


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
                     positions: bool = True, head: bool = True) -> DenseStats:
    """One forward pass of the (still dense) model over the calibration windows, with hooks on the
    residual positions (if `positions`) and on the head input (if `head` and there is a head_proj)."""
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

    hooks = [rotation.norm_at(model, p).register_forward_pre_hook(lambda m, a, p=p: accumulate(covs[p], a[0], True))
             for p in range(len(covs))]
    if head is not None:
        hooks.append(model.head_proj.register_forward_hook(lambda m, a, out: accumulate(head, out)))
    model.to(device)
    try:
        for start in range(0, len(input_ids), options.batch_size):
            ids = input_ids[start:start + options.batch_size].to(device)
            mask = attention_mask[start:start + options.batch_size].to(device)
            current["mask"] = mask.bool()
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.to("cpu")
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


def choose_basis(options: SliceOptions, batches, masks, position: int, hidden: int) -> torch.Tensor:
    if options.rotation == "pca":
        return principal_basis(covariance(batches, masks), options.damping)
    if options.rotation == "random":
        return rotation.random_orthogonal(hidden, options.seed + position).to(batches[0].device)
    return torch.eye(hidden, dtype=torch.float64, device=batches[0].device)


def _check_options(options: SliceOptions) -> None:
    for name, value, allowed in (("rotation", options.rotation, ROTATIONS), ("tie", options.tie, TIE_MODES),
                                 ("tie-basis", options.tie_basis, TIE_BASES), ("share", options.share, budget.SHARE_MODES),
                                 ("budget", options.budget, budget.BUDGETS)):
        if value not in allowed:
            raise InvalidOptionError(f"unknown --{name} {value!r}; choose one of {', '.join(allowed)}")
    if options.target_params is not None and (not isinstance(options.target_params, int) or options.target_params < 1):
        raise InvalidOptionError(f"--target-params must be a positive integer, got {options.target_params!r}")


@dataclass
class _Calibration:
    """Calibration batches on the compute device, and the residual entering the current position."""
    masks: list
    residuals: list
    ropes: list
    biases: list


def _embed_calibration(model, input_ids, attention_mask, options) -> _Calibration:
    device, dtype = torch.device(options.device), model.dtype
    for module in (model.embed_tokens, model.embed_positions, model.embed_proj, model.rotary):
        if module is not None:
            module.to(device)
    cal = _Calibration([], [], [], [])
    for start in range(0, len(input_ids), options.batch_size):
        ids = input_ids[start:start + options.batch_size].to(device)
        mask = attention_mask[start:start + options.batch_size].to(device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cal.masks.append(mask)
        cal.residuals.append(model.hidden_input(ids, positions))
        cal.ropes.append(model.rope(positions, dtype))
        cal.biases.append(attention_bias(mask, ids.shape[1], dtype, model.config.sliding_window))
    return cal


def _group_basis(model, options, cal: _Calibration, stats: DenseStats | None, groups, position) -> torch.Tensor:
    """Full D x D basis for the group starting at `position` (columns by decreasing variance)."""
    hidden, device = model.config.hidden_size, torch.device(options.device)
    if options.rotation != "pca":
        return choose_basis(options, cal.residuals or [torch.zeros(1, device=device)], cal.masks, position, hidden)
    members = [p for p, g in enumerate(groups) if g == groups[position]]
    if options.share == "all":  # every member measured once on the dense model
        covs = [stats.covariances[p] for p in members]
    else:  # sequential: the residual entering the group, from the already-sliced model
        covs = [covariance(cal.residuals, cal.masks)]
        if len(members) > 1:  # the layer's MLP position: same residual after the dense attention
            eye = torch.eye(hidden, dtype=torch.float64, device=device)
            after = [_next_residual(model, position, h, eye, rope, bias)
                     for h, rope, bias in zip(cal.residuals, cal.ropes, cal.biases)]
            covs.append(covariance(after, cal.masks))
    if 0 in members and joint_tie(model, options):
        covs.append(stats.head)
    return principal_basis(normalised_sum(covs), options.damping)


@torch.no_grad()
def slice_model(model: SlicedForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                options: SliceOptions, progress=None) -> SlicedForCausalLM:
    """Rotate and slice `model` in place. `input_ids`/`attention_mask`: calibration windows [n, seq]."""
    _check_options(options)
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
                                 positions=options.share == "all" or widths is None, head=joint_tie(model, options))
    if widths is None:  # spectrum budget
        problem = budget_problem(model, options, groups)
        losses = group_losses(stats, groups, model, options)
        plan = budget.plan_variance if options.budget == "variance" else budget.plan_global
        widths = plan(problem, options.target_params, losses)
    _rotate_and_slice(model, input_ids, attention_mask, options, widths, groups, stats, progress)
    model.to("cpu")
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


def _rotate_and_slice(model, input_ids, attention_mask, options, widths, groups, stats, progress) -> None:
    config = model.config
    device, dtype, hidden = torch.device(options.device), model.dtype, config.hidden_size
    final = config.num_positions
    # with one dense-measured basis for everything, no residual needs to be propagated
    propagate = not (options.share == "all" or options.rotation != "pca")
    cal = _embed_calibration(model, input_ids, attention_mask, options) if propagate else _Calibration([], [], [], [])

    previous, full = None, None  # sliced basis of the position before; full basis of the current group
    for position in range(final + 1):
        width = widths[position]
        index = None if position == final else rotation._layer_and_kind(model, position)[0]
        if index is not None:
            model.layers[index].to(device)
        new_group = position == 0 or groups[position] != groups[position - 1]
        if position == final and width == hidden and new_group:
            full = torch.eye(hidden, dtype=torch.float64, device=device)  # head stays in the original basis
        elif new_group:
            full = _group_basis(model, options, cal, stats, groups, position)
        basis = full[:, :width]
        rotation.rotate_writers(model, position, basis)
        if previous is not None and new_group:
            rotation.set_shortcut(model, position - 1, previous.T @ basis, dtype)
        rotation.set_width(model, position, width)
        rotation.rotate_readers(model, position, basis)
        if position < final and propagate:
            sliced = [(x.to(torch.float64) @ basis).to(dtype) for x in cal.residuals]
            cal.residuals = [_next_residual(model, position, h, basis, rope, bias)
                             for h, rope, bias in zip(sliced, cal.ropes, cal.biases)]
        if index is not None and (position + 1 == final or rotation._layer_and_kind(model, position + 1)[0] != index):
            model.layers[index].to("cpu")
        previous = basis
        if progress is not None:
            progress(position + 1, final + 1)


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
