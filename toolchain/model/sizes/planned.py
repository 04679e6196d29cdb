"""The model `toolchain slice` will write, predicted from the dense config and the options.

SliceGPT (toolchain/compress/slicegpt.py): every residual position gets width d = int((1-s)·D) rounded
down to a multiple of 8 (the head's position stays D unless --slice-head). Positions sharing one
rotation (--share) carry the residual as is; wherever the basis changes between positions p and p+1
a d_p x d_{p+1} shortcut is written — even between equal widths, since the bases differ. A tied RMSNorm
model keeps one table: sliced to V x d_0 with a d_L x d_0 head_proj (--tie slice), kept V x D behind a
D x d_0 embed_proj with a d_L x D head_proj (--tie project), or untied (--tie untie: V x d_0 table and
V x d_L head).

MoDeGPT (toolchain/compress/modegpt.py): layer l loses the fraction s_l of each inner dim, rounded to
multiples of --modegpt-multiple with the total corrected as `sizes.modegpt` does it (the compressor
calls the same function). The compressor picks s_l from the block influence it measures on calibration
data, so only the uniform allocation (every s_l = c) is known in advance: its block total matches the
compressor's to within per-layer rounding, and it is exact for given per-layer sparsities.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolchain.core.errors import InvalidOptionError
from toolchain.model.sizes.decoder import Decoder, canonical
from toolchain.model.sizes.modegpt import kept_dim, modegpt_dims  # noqa: F401  (re-exported)

TIE_MODES = ("slice", "project", "untie")
SHARE_MODES = ("none", "layer", "all")
METHODS = ("slicegpt", "modegpt", "slicegpt+modegpt", "none")
ROUND_TO = 8


@dataclass(frozen=True)
class CompressionPlan:
    """The size-changing options of `toolchain slice` / `build` (their defaults)."""

    method: str = "slicegpt"
    slice: float = 0.3
    slice_head: bool = False
    tie: str = "slice"
    share: str = "none"
    compression: float = 0.25  # MoDeGPT: fraction of block parameters removed
    widths: tuple[int, ...] | None = None  # explicit residual widths instead of --slice
    layer_sparsity: tuple[float, ...] | None = None  # MoDeGPT per layer; None: every layer `compression`
    modegpt_multiple: int = 8  # MoDeGPT: kept head dims and intermediate sizes are multiples of this
    round_to: int = ROUND_TO

    def check(self) -> None:
        for name, value, allowed in (("method", self.method, METHODS), ("tie", self.tie, TIE_MODES),
                                     ("share", self.share, SHARE_MODES)):
            if value not in allowed:
                raise InvalidOptionError(f"unknown --{name} {value!r}; choose one of {', '.join(allowed)}")
        check_slice(self.slice)
        if "modegpt" in self.method and not (isinstance(self.compression, (int, float))
                                             and 0.0 <= self.compression < 1.0):
            raise InvalidOptionError(f"--compression must be in [0, 1), got {self.compression!r}")
        if isinstance(self.modegpt_multiple, bool) or not isinstance(self.modegpt_multiple, int) \
                or self.modegpt_multiple < 1:
            raise InvalidOptionError(f"--modegpt-multiple must be a positive integer, got {self.modegpt_multiple!r}")


def check_slice(fraction: float) -> None:
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise InvalidOptionError(
            f"--slice must be in [0, 1), got {fraction}; e.g. --slice 0.3 removes 30% of the width")


def slice_width(hidden: int, fraction: float, round_to: int = ROUND_TO) -> int:
    """d = int((1-s)·D) rounded down to a multiple of `round_to` (the compressor's float arithmetic)."""
    check_slice(fraction)
    width = int((1.0 - fraction) * hidden) // round_to * round_to if fraction > 0 else hidden
    if width <= 0:
        raise InvalidOptionError(
            f"--slice {fraction} leaves no width: int((1-s)*{hidden}) rounded down to a multiple of {round_to} is 0; "
            "use a smaller --slice")
    return width


def uniform_widths(hidden: int, fraction: float, positions: int, slice_head: bool, round_to: int = ROUND_TO) -> list[int]:
    """One width for every position; the head's is D unless it is sliced too."""
    width = slice_width(hidden, fraction, round_to)
    return [width] * positions + [width if slice_head else hidden]


def position_groups(positions: int, parallel_block: bool, share: str, slice_head: bool) -> list[int]:
    """Group id of every position 0..L (L: the head's). A group shares one rotation. The head's position
    joins a group only when it is sliced (an unsliced head stays in the original basis)."""
    if share not in SHARE_MODES:
        raise InvalidOptionError(f"unknown --share {share!r}; choose one of {', '.join(SHARE_MODES)}")
    if share == "none" or (share == "layer" and parallel_block):
        groups = list(range(positions))
    elif share == "layer":
        groups = [p // 2 for p in range(positions)]
    else:
        groups = [0] * positions
    head_joins = share == "all" and slice_head
    return groups + [groups[-1] if head_joins else max(groups) + 1]


def shortcuts_of(groups: list[int]) -> tuple[bool, ...]:
    """A shortcut wherever the basis changes from one position to the next."""
    return tuple(groups[p] != groups[p + 1] for p in range(len(groups) - 1))


def sliced(model: Decoder, widths: list[int], groups: list[int], project_table: bool = False) -> Decoder:
    """A canonical dense model after rotation and slicing to `widths` with these rotation groups.
    `project_table`: a tied model keeps its V x D table behind a D x d_0 embed_proj (--tie project)."""
    project = project_table and model.tied and not model.embed_proj
    return model.replace(
        residual_widths=tuple(widths), shortcuts=shortcuts_of(groups),
        embed_proj=model.embed_proj or project,
        table_width=model.hidden_size if project else model.table_width)


def planned(dense: Decoder, plan: CompressionPlan = CompressionPlan()) -> Decoder:
    """The canonical model `slice` writes for the dense model `dense` (an HF config's Decoder)."""
    plan.check()
    if dense.fused and dense.is_sliced:
        raise InvalidOptionError(f"{dense.name} is already sliced; plan the original model instead")
    model = canonical(dense, plan.tie)
    if "slicegpt" in plan.method:
        positions, hidden = model.positions, model.hidden_size
        if plan.widths is None:
            widths = uniform_widths(hidden, plan.slice, positions, plan.slice_head, plan.round_to)
        else:
            widths = list(plan.widths) + ([] if len(plan.widths) == positions + 1
                                          else [plan.widths[-1] if plan.slice_head else hidden])
        slice_head = plan.slice_head or widths[-1] < hidden
        groups = position_groups(positions, model.parallel_block, plan.share, slice_head)
        model = sliced(model, widths, groups, project_table=plan.tie == "project")
    if "modegpt" in plan.method:
        sparsities = list(plan.layer_sparsity or [plan.compression] * model.num_layers)
        model = modegpt_dims(model, sparsities, plan.modegpt_multiple)
    return model.replace(compression={"method": plan.method, **({"slice": plan.slice} if "slicegpt" in plan.method
                                                                else {}),
                                      "tie": plan.tie, "share": plan.share, "slice_head": plan.slice_head,
                                      **({"compression": plan.compression} if "modegpt" in plan.method else {})})
