"""Residual widths under a total-parameter budget, and the size of a sliced model before slicing it.

A sliced canonical model's total parameter count is a quadratic function of its residual widths d_p
(p = 0..L, L = the head's position):

    total = const + Σ_p a_p·d_p + Σ_(i,j) d_i·d_j

Linear terms: block readers and writers, the token table (V per unit of d_0 when the table is sliced).
Bilinear terms: the shortcut matrices (d_p × d_{p+1} wherever the basis changes) and, for a tied model
whose table is sliced, the head projection d_0 × d_L. `SizeModel` holds these terms, so a target can be
met exactly — shortcut, table and head cost included — before any calibration runs.

Positions that share one rotation form a *group*: they must have one width (the carry between them is
the identity, so there is no matrix to change the width), and no shortcut sits between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolchain.core.errors import InvalidOptionError
from toolchain.model import sizes
from toolchain.model.modeling import SlicedConfig

SHARE_MODES = sizes.SHARE_MODES
BUDGETS = ("uniform", "variance", "global")


class NotSmallerError(InvalidOptionError):
    """The requested setting gives a model at least as large as its input (and --allow-larger is off)."""


@dataclass(frozen=True)
class SizeModel:
    hidden: int
    const: int
    linear: tuple[int, ...]  # a_p, one per position 0..L
    pairs: tuple[tuple[int, int], ...]  # (i, j): one d_i x d_j matrix

    def total(self, widths: list[int]) -> int:
        return (self.const + sum(a * d for a, d in zip(self.linear, widths))
                + sum(widths[i] * widths[j] for i, j in self.pairs))


def position_groups(config: SlicedConfig, share: str, slice_head: bool) -> list[int]:
    """Group id of every position 0..L (see sizes.position_groups)."""
    return sizes.position_groups(config.num_positions, config.parallel_block, share, slice_head)


def size_model(config: SlicedConfig, groups: list[int], project_table: bool = False) -> SizeModel:
    """Size terms of `config`'s model once sliced with these groups. `project_table`: a tied model
    that keeps its V x D table and reads it through a D x d_0 `embed_proj` (--tie project). The terms
    come from the size model's tensor list, so a budget counts exactly what gets written."""
    model = sizes.sliced(sizes.describe(config), list(config.residual_widths), groups, project_table)
    const, linear, pairs = sizes.size_terms(model)
    return SizeModel(config.hidden_size, const, tuple(linear), tuple(pairs))


def check_group_widths(widths: list[int], groups: list[int]) -> None:
    for p in range(len(widths) - 1):
        if groups[p] == groups[p + 1] and widths[p] != widths[p + 1]:
            raise InvalidOptionError(
                f"positions {p} and {p + 1} share one rotation (--share) so they need one width; got "
                f"{widths[p]} and {widths[p + 1]}; give equal widths or use --share none")


# ---- planners: widths (one per position) whose SizeModel total is at most `target` ----

@dataclass
class BudgetProblem:
    size: SizeModel
    groups: list[int]
    fixed: dict[int, int]  # group -> width it must keep (the unsliced head)
    round_to: int = 8

    @property
    def free(self) -> list[int]:
        return [g for g in sorted(set(self.groups)) if g not in self.fixed]

    def widths(self, group_widths: dict[int, int]) -> list[int]:
        merged = {**group_widths, **self.fixed}
        return [merged[g] for g in self.groups]

    def total(self, group_widths: dict[int, int]) -> int:
        return self.size.total(self.widths(group_widths))

    def saving(self, group_widths: dict[int, int], group: int, width: int) -> int:
        """Parameters saved by moving `group` to `width`: only the terms touching it (fast enough for
        the greedy planner's thousands of trials)."""
        linear, partners = self._terms(group)
        old = group_widths.get(group, self.fixed.get(group))
        saved = linear * (old - width)
        for partner in partners:
            if partner is None:  # both ends in this group
                saved += old * old - width * width
            else:
                saved += (old - width) * group_widths.get(partner, self.fixed.get(partner))
        return saved

    def _terms(self, group: int) -> tuple[int, list[int | None]]:
        """Σ a_p over the group's positions, and per bilinear term the group at its other end."""
        cache = self.__dict__.setdefault("_cache", {})
        if group not in cache:
            linear = sum(a for a, g in zip(self.size.linear, self.groups) if g == group)
            partners = []
            for i, j in self.size.pairs:
                gi, gj = self.groups[i], self.groups[j]
                if gi == group or gj == group:
                    partners.append(None if gi == gj else (gj if gi == group else gi))
            cache[group] = linear, partners
        return cache[group]

    def steps(self) -> list[int]:
        """Allowed widths, widest first: multiples of round_to up to the hidden size."""
        top = self.size.hidden // self.round_to * self.round_to
        return [self.size.hidden] + [w for w in range(top, 0, -self.round_to) if w != self.size.hidden]


def _too_small(problem: BudgetProblem, target: int) -> InvalidOptionError:
    smallest = problem.total({g: problem.round_to for g in problem.free})
    return InvalidOptionError(
        f"a total of {target:,} parameters cannot be reached: even width {problem.round_to} everywhere leaves "
        f"{smallest:,}; ask for a larger --target-params / --target-ratio")


def plan_uniform(problem: BudgetProblem, target: int) -> list[int]:
    """The widest single width (for every free group) that fits."""
    for width in problem.steps():
        choice = {g: width for g in problem.free}
        if problem.total(choice) <= target:
            return problem.widths(choice)
    raise _too_small(problem, target)


def unexplained(eigenvalues: torch.Tensor) -> list[float]:
    """unexplained[d] = variance outside the first d components (index 0..D)."""
    values = eigenvalues.double().clamp(min=0).sort(descending=True).values
    tail = values.flip(0).cumsum(0).flip(0).tolist()
    return tail + [0.0]


def plan_variance(problem: BudgetProblem, target: int, losses: dict[int, list[float]]) -> list[int]:
    """One explained-variance fraction t for all groups; each takes the narrowest width reaching it.
    t is bisected to the largest value that fits."""
    steps = problem.steps()

    def choose(t: float) -> dict[int, int]:
        choice = {}
        for g in problem.free:
            loss = losses[g]
            allowed = loss[0] * (1.0 - t)
            choice[g] = next((w for w in reversed(steps) if loss[w] <= allowed), steps[0])
        return choice

    low, high = 0.0, 1.0
    if problem.total(choose(low)) > target:
        raise _too_small(problem, target)
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if problem.total(choose(mid)) <= target else (low, mid)
    return problem.widths(choose(low))


def plan_global(problem: BudgetProblem, target: int, losses: dict[int, list[float]]) -> list[int]:
    """Greedy global allocation: start at full width and repeatedly narrow, by one step, the group
    whose lost variance per parameter saved is smallest, until the total fits. The loss per group is
    convex in its width (eigenvalues descend), so the greedy path tracks the Lagrangian optimum."""
    steps = problem.steps()
    index = {g: 0 for g in problem.free}  # position in `steps`
    current = {g: steps[0] for g in problem.free}
    total = problem.total(current)
    while total > target:
        best, best_cost, best_saved = None, None, None
        for g in problem.free:
            if index[g] + 1 >= len(steps):
                continue
            saved = problem.saving(current, g, steps[index[g] + 1])
            if saved <= 0:
                continue
            cost = (losses[g][steps[index[g] + 1]] - losses[g][current[g]]) / saved
            if best_cost is None or cost < best_cost:
                best, best_cost, best_saved = g, cost, saved
        if best is None:
            raise _too_small(problem, target)
        index[best] += 1
        current[best] = steps[index[best]]
        total -= best_saved
    assert total == problem.total(current)
    return problem.widths(current)


# ---- honest accounting: never call a model compressed unless it is smaller than its input ----

def weight_bytes(parameters: int, dtype: torch.dtype) -> int:
    return sizes.weight_bytes(parameters, dtype)


def ensure_smaller(total: int, source_total: int, allow_larger: bool, what: str, fix: str) -> None:
    """Raise NotSmallerError when `total` (parameters, hence bytes at one dtype) is not below the
    source's tied total, unless the user asked for it anyway."""
    if total < source_total or allow_larger:
        return
    raise NotSmallerError(
        f"{what} gives {total:,} parameters, {total / source_total:.1%} of the input's {source_total:,} "
        f"(tied weights counted once, shortcuts and head included): the result would not be smaller, so nothing "
        f"was written. {fix}, or pass --allow-larger to write it anyway")
