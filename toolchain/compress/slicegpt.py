"""SliceGPT: rotate each residual position onto the principal components of its calibration
activations, then keep the leading d_p components.

Calibration runs position by position through the already-sliced model: the residual entering
position p+1 is produced by blocks whose inputs were already rotated and sliced, so errors made
upstream are what later PCAs see. Only the calibration activations (kept in the model's dtype, or
as files with `offload`) and the current layer are touched at a time. Where a layer's weights come
from and go to is a `WeightStore`: the model itself here, or the checkpoint read and the output
written layer by layer (toolchain/streaming.py); the same loop runs either way.

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
from pathlib import Path

import torch

from toolchain.core.errors import InvalidOptionError
from toolchain.model.finite import count_non_finite, require_finite_statistics
from toolchain.model.modeling import SlicedForCausalLM, attention_bias
from toolchain.compress import budget, rotation

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

    cal = _embed_calibration(model, input_ids, attention_mask, options, weights, offload)
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


class WeightStore:
    """Where the weights of the model being sliced live. This one: already in memory (the model as
    given); a layer is moved to the compute device while it is worked on and back to the CPU after.
    toolchain/streaming.py's subclass reads each layer from the checkpoint when opened and writes it
    out (or drops it) when closed, so only the layers in flight are ever resident."""

    def open_embedding(self, model, device) -> None:
        for module in (model.embed_tokens, model.embed_positions, model.embed_proj, model.rotary):
            if module is not None:
                module.to(device)

    def close_embedding(self, model, write: bool) -> None:
        for module in (model.embed_tokens, model.embed_positions, model.embed_proj):
            if module is not None:
                module.to("cpu")

    def open_layer(self, model, index: int, device) -> None:
        model.layers[index].to(device)

    def close_layer(self, model, index: int, write: bool) -> None:
        model.layers[index].to("cpu")

    def open_head(self, model, device, table: bool = True) -> None:
        """The head_proj (tied), and with `table` the untied LM head, on the compute device (a tied
        head is the token table, which the head's position never rotates)."""
        for module in (model.head_proj, model.lm_head if table and not model.config.tie_word_embeddings else None):
            if module is not None:
                module.to(device)

    def close_head(self, model, write: bool) -> None:
        model.to("cpu")

    def finish(self, model) -> None:
        model.to("cpu")


class ActivationStore:
    """One tensor per calibration batch (the residual stream), kept on the compute device or, with a
    directory, as one safetensors file per batch (read back when indexed)."""

    def __init__(self, device, directory: Path | None = None):
        import tempfile

        self.device = torch.device(device)
        self._tensors: list[torch.Tensor | None] = []
        self.directory = None if directory is None else Path(tempfile.mkdtemp(prefix="activations-",
                                                                                dir=Path(directory)))

    def __len__(self) -> int:
        return len(self._tensors)

    def _path(self, index: int):
        return self.directory / f"batch-{index:05d}.safetensors"

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.directory is None:
            return self._tensors[index]
        from safetensors.torch import load_file

        return load_file(self._path(index), device=str(self.device))["h"]

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        if self.directory is None:
            self._tensors[index] = tensor
            return
        from safetensors.torch import save_file

        save_file({"h": tensor.detach().to("cpu").contiguous()}, self._path(index))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def append(self, tensor: torch.Tensor) -> None:
        self._tensors.append(None)
        self[len(self._tensors) - 1] = tensor

    def close(self) -> None:
        """Forget every batch (and delete the files)."""
        import shutil

        self._tensors = []
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


class _Calibration:
    """Calibration batches: masks and positions (small, on the compute device) and the residual entering
    the current position (an ActivationStore). RoPE tables and attention biases are rebuilt per batch
    when needed rather than kept (a bias is batch x seq² values)."""

    def __init__(self, model, device, offload=None):
        self.model, self.device = model, device
        self.masks: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.residuals = ActivationStore(device, offload)

    def __len__(self) -> int:
        return len(self.masks)

    def batch(self, index: int):
        """(mask, rope, attention bias) of batch `index`."""
        mask, dtype = self.masks[index], self.model.dtype
        rope = self.model.rope(self.positions[index], dtype)
        return mask, rope, attention_bias(mask, mask.shape[1], dtype, self.model.config.sliding_window)


def _embed_calibration(model, input_ids, attention_mask, options, weights: WeightStore,
                       offload=None) -> _Calibration:
    """Open the embedding and compute the residual at position 0 for every batch (the embedding
    stays open: position 0's writers are the embedding)."""
    device = torch.device(options.device)
    weights.open_embedding(model, device)
    cal = _Calibration(model, device, offload)
    for start in range(0, len(input_ids), options.batch_size):
        ids = input_ids[start:start + options.batch_size].to(device)
        mask = attention_mask[start:start + options.batch_size].to(device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cal.masks.append(mask)
        cal.positions.append(positions)
        cal.residuals.append(model.hidden_input(ids, positions))
    return cal


def _group_basis(model, options, cal: _Calibration, stats: DenseStats | None, groups, position) -> torch.Tensor:
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
            after = (_next_residual(model, position, cal.residuals[b], eye, *cal.batch(b)[1:]) for b in range(len(cal)))
            covs.append(covariance(after, cal.masks, f"residual position {position + 1}"))
    if 0 in members and joint_tie(model, options):
        covs.append(stats.head)
    return principal_basis(normalised_sum(covs), options.damping)


@torch.no_grad()
def slice_model(model: SlicedForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                options: SliceOptions, progress=None, weights: WeightStore | None = None,
                offload: Path | None = None) -> SlicedForCausalLM:
    """Rotate and slice `model` in place. `input_ids`/`attention_mask`: calibration windows [n, seq].
    `weights`: where the layers live (default: in the model; see toolchain/streaming.py for a model
    read from its checkpoint layer by layer). `offload`: keep calibration activations as files there."""
    _check_options(options)
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
        cal = _embed_calibration(model, input_ids, attention_mask, options, weights, offload)
    else:
        weights.open_embedding(model, device)
        cal = _Calibration(model, device)
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
                    cal.residuals[b] = _next_residual(model, position, sliced, basis, *cal.batch(b)[1:])
            previous = basis
            if progress is not None:
                progress(position + 1, final + 1)
        weights.close_head(model, write=True)
    finally:
        cal.residuals.close()


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
