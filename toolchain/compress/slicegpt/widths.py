"""The residual widths to slice to: from --slice, --widths or a parameter target, and the check that
the result will be smaller than its source, all before any calibration."""

from __future__ import annotations

from toolchain.core.errors import InvalidOptionError
from toolchain.model import sizes
from toolchain.model.modeling import SlicedForCausalLM
from toolchain.compress import budget
from toolchain.compress.options import SliceOptions


def uniform_widths(hidden: int, fraction: float, positions: int, slice_head: bool, round_to: int = 8) -> list[int]:
    """d = int((1-s)·D) rounded down to a multiple of `round_to` at every position."""
    return sizes.uniform_widths(hidden, fraction, positions, slice_head, round_to)


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
