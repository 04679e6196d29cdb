"""The options schema: `slice` and `build` take the same compression options, and every range a
command's help states is the range its validation accepts."""

from __future__ import annotations

import re
from dataclasses import asdict, fields

import pytest
import typer

from toolchain.app.cli import app
from toolchain.compress.options import (CompressOptions, SliceOptions, SlicingOptions, flag_of, help_text,
                                        option_fields)
from toolchain.core.errors import InvalidOptionError

RANGE = re.compile(r"in ([\[(])\s*(-?[\d.]+),\s*(-?[\d.]+)\s*([\])])")


def commands(group, prefix: str = "") -> dict:
    """Every command of `group`, subgroups included, by its path (e.g. "trt build")."""
    found = {}
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        found[path] = command
        if hasattr(command, "commands"):  # a group (typer vendors click: no isinstance)
            found |= commands(command, path + " ")
    return found


def is_option(param) -> bool:
    return param.param_type_name == "option"


def option_flags(command) -> set[str]:
    return {flag for param in command.params if is_option(param) for flag in param.opts}


def schema_field(flag: str):
    for f in option_fields(CompressOptions):
        if flag_of(f.name, f.metadata["option"]) == flag:
            return f
    return None


def accepted(name: str, value) -> bool:
    try:
        CompressOptions(model="m", **{name: value}).validate()
    except InvalidOptionError:
        return False
    return True


def test_build_takes_every_option_of_slice():
    every = commands(typer.main.get_command(app))
    slice_flags, build_flags = option_flags(every["slice"]), option_flags(every["build"])
    assert slice_flags <= build_flags, sorted(slice_flags - build_flags)
    schema = {flag_of(f.name, f.metadata["option"]) for f in option_fields(CompressOptions) if f.metadata["option"].cli}
    assert schema <= slice_flags, sorted(schema - slice_flags)


def test_stated_ranges_are_the_validated_ranges():
    checked = set()
    for path, command in commands(typer.main.get_command(app)).items():
        for param in command.params:
            match = RANGE.search(getattr(param, "help", None) or "")
            field = schema_field(param.opts[0]) if match and is_option(param) else None
            if field is None or param.help != help_text(field.metadata["option"]):
                continue  # an option of the same name declared otherwise (plan's --slice): tests/test_help.py
            opening, low, high, closing = match.groups()
            low, high = float(low), float(high)
            step = (high - low) * 1e-3
            where = f"{path} {param.opts[0]}: {match.group(0)}"
            assert accepted(field.name, low) == (opening == "["), where
            assert accepted(field.name, high) == (closing == "]"), where
            assert accepted(field.name, low + step) and accepted(field.name, high - step), where
            assert not accepted(field.name, low - step) and not accepted(field.name, high + step), where
            checked.add(field.name)
    assert {"slice", "compression", "target_ratio"} <= checked


def test_slice_zero_only_where_the_rotation_alone_is_wanted():
    assert not accepted("slice", 0.0)
    assert CompressOptions(model="m", slice=0.0, rotation="random").validate() is None
    assert CompressOptions(model="m", slice=0.0, widths=[32, 32]).validate() is None
    SliceOptions(slice=0.0).validate()  # the library's default rotates without slicing
    with pytest.raises(InvalidOptionError, match=r"--slice must be in \[0, 1\)"):
        SliceOptions(slice=1.0).validate()


def test_compressors_options_derive_from_the_compress_options():
    options = CompressOptions(model="m", slice=0.2, share="layer", tie_basis="first", budget="global",
                              target_ratio=0.8, compression=0.4, batch_size=4)
    sliced = options.slice_options("cpu", target_params=1000)
    assert {f.name for f in fields(SlicingOptions)} <= {f.name for f in fields(sliced)}
    assert (sliced.slice, sliced.share, sliced.tie_basis, sliced.budget, sliced.batch_size) == (0.2, "layer", "first",
                                                                                              "global", 4)
    assert sliced.target_params == 1000 and sliced.extra == {"calibration": "ptb"}
    assert options.modegpt_options().compression == 0.4


def test_build_options_extend_the_compress_options_and_keep_the_stage_key():
    from toolchain.app.pipeline import BuildOptions, _compress_key

    build = BuildOptions(model="m", target="torch", share="layer", target_ratio=0.8)
    assert asdict(build.compress_options()) == {k: v for k, v in asdict(build).items()
                                                if k in {f.name for f in fields(CompressOptions)}}
    # the key's field names are those of the compress options before they had a schema
    assert set(_compress_key(build)) == {
        "model", "method", "slice", "compression", "widths", "rotation", "slice_head", "tie", "tie_basis", "share",
        "target_params", "target_ratio", "budget", "allow_larger", "calib", "nsamples", "seqlen", "seed", "device",
        "batch_size", "extra"}
    modegpt = BuildOptions(model="m", target="torch", method="modegpt")
    assert _compress_key(modegpt)["modegpt_multiple"] == 8  # MoDeGPT's rounding changes its output: in its key


def test_build_passes_the_compression_options_through(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import toolchain.app.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "build", lambda options, out, **kwargs: seen.setdefault("options", options) and
                        {"stages": {}})
    result = CliRunner().invoke(app, ["build", "--model", "m", "--out", str(tmp_path / "b"), "--target-ratio", "0.8",
                                      "--share", "all", "--budget", "global", "--tie-basis", "first", "--allow-larger",
                                      "--widths", "8,8", "--quiet"])
    assert result.exit_code == 0, result.output
    options = seen["options"]
    assert (options.target_ratio, options.share, options.budget, options.tie_basis, options.allow_larger,
            options.widths) == (0.8, "all", "global", "first", True, [8, 8])
