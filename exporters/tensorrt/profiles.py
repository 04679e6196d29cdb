"""TensorRT optimisation profiles: min/opt/max of every dynamic dim, per phase (prefill, decode), and
the input shapes they turn into for trt_build.json."""

from __future__ import annotations

from dataclasses import dataclass

from toolchain.core.iospec import BATCH, PAST, SEQ, TOTAL


@dataclass(frozen=True)
class ProfileRange:
    """(min, opt, max) per named dim for one optimisation profile."""

    name: str
    batch: tuple[int, int, int]
    sequence: tuple[int, int, int]
    past: tuple[int, int, int]

    @property
    def dims(self) -> dict[str, tuple[int, int, int]]:
        total = tuple(s + p for s, p in zip(self.sequence, self.past))
        return {BATCH: self.batch, SEQ: self.sequence, PAST: self.past, TOTAL: total}


def default_profiles(max_batch: int, max_prompt: int, max_context: int, opt_batch: int = 1) -> list[ProfileRange]:
    """prefill: any prompt up to max_prompt with an empty cache; decode: one token on 1..max_context-1
    cached ones. Profile 0 is prefill, 1 is decode (the session picks by phase)."""
    batch = (1, min(opt_batch, max_batch), max_batch)
    prefill = ProfileRange("prefill", batch, (1, max(1, max_prompt // 2), max_prompt), (0, 0, 0))
    decode = ProfileRange("decode", batch, (1, 1, 1), (1, max(1, max_context // 2), max_context - 1))
    return [prefill, decode]


def profile_shapes(profile: ProfileRange, inputs: list[dict]) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes for every graph input (`inputs`: export_config.json's I/O spec)."""
    dims, shapes = profile.dims, {}
    for spec in inputs:
        per_axis = [dims[d] if isinstance(d, str) else (d, d, d) for d in spec["shape"]]
        shapes[spec["name"]] = {key: [axis[i] for axis in per_axis] for i, key in enumerate(("min", "opt", "max"))}
    return shapes


def covering_profile(profiles: list[dict], shapes: dict[str, tuple], prefer: str | None = None) -> dict | None:
    """The profile (trt_build.json entry) whose ranges hold every shape in `shapes`; `prefer` first."""
    ordered = sorted(profiles, key=lambda p: p["name"] != prefer)
    for profile in ordered:
        spec = profile["shapes"]
        if all(name in spec and len(shape) == len(spec[name]["min"]) and
               all(lo <= s <= hi for s, lo, hi in zip(shape, spec[name]["min"], spec[name]["max"]))
               for name, shape in shapes.items()):
            return profile
    return None
