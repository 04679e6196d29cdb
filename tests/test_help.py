"""Help that matches behaviour: every command's `--help` states ranges and choices, and each is
probed through the command itself — the ends of a stated range and every stated choice are accepted,
values outside are refused with one `error:` line naming the option and exit code 2."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from toolchain.app.cli import app

INTERVAL = re.compile(r"in ([\[(])\s*(-?[\d.]+),\s*(-?[\d.]+)\s*([\])])")
AT_LEAST = re.compile(r"(?:≥|>=)\s*(\d+)")
# a list of single-word choices at the start of the help or after "...: ", once parentheses are dropped
CHOICES = re.compile(r"(?:^|: )([\w+-]+(?: \| [\w+-]+)+)(?=$|[:.;,])")
# choices that need hardware or a library this machine may not have: refused here for a reason the help states
MACHINE = {"cuda", "tensorrt"}
# values refused here for a condition their help states (gptq "needs the build's canonical model")
CONDITIONAL = {("deploy", "--quant-algorithm", "gptq")}
MISSING = "no-such-dir"
# what a command needs besides the probed option; the paths do not exist, so a value the command
# accepts ends in an error about them (or, for plan, in a plan)
BASE = {
    "slice": ["--model", MISSING, "--out", "out"],
    "build": ["--model", MISSING, "--out", "out"],
    "recover": [MISSING, "--out", "out"],
    "plan": ["--model", "{config}"],
    "eval": [MISSING],
    "export": [MISSING, "--out", "out"],
    "validate": [MISSING],
    "bench": [MISSING],
    "deploy": [MISSING, "--genai", "--out", "out"],
    "trt validate": [MISSING],
}
# options that only apply next to another one (their help names it)
CONTEXT = {"--block-size": ["--quantize", "int4"], "--residual-bits": ["--quantize", "int4"],
           "--quant-algorithm": ["--quantize", "int4"], "--quant-compute": ["--quantize", "int4"]}
# options whose help describes them but which a command reads only later (with a model): probed
# through their schema validation in tests/test_options.py
SKIP = {"--widths", "--target-params"}


def commands(group, prefix: str = "") -> dict:
    found = {}
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if hasattr(command, "commands"):  # a group (typer vendors click: no isinstance)
            found |= commands(command, path + " ")
        else:
            found[path] = command
    return found


def without_parentheses(text: str) -> str:
    while True:
        shorter = re.sub(r"\s*\([^()]*\)", "", text)
        if shorter == text:
            return text
        text = shorter


@dataclass
class Claim:
    command: str
    flag: str
    accepted: list
    refused: list
    help: str


def claims() -> list[Claim]:
    """Every range or choice list an option's help states, as values to accept and values to refuse."""
    found = []
    for path, command in commands(typer.main.get_command(app)).items():
        for param in command.params:
            text = " ".join((getattr(param, "help", None) or "").split())
            if param.param_type_name != "option" or param.is_flag or not text or param.opts[0] in SKIP:
                continue
            integer = isinstance(param.default, int)
            accepted, refused = [], []
            if m := INTERVAL.search(text):
                opening, low, high, closing = m.groups()
                low, high = float(low), float(high)
                step = (high - low) * 1e-3
                (accepted if opening == "[" else refused).append(low)
                (accepted if closing == "]" else refused).append(high)
                # inside: a quarter in from each end (right at an open end, a model's width may refuse it)
                accepted += [low + (high - low) / 4, high - (high - low) / 4]
                refused += [low - step, high + step]
            elif m := AT_LEAST.search(text):
                low = int(m.group(1))
                accepted.append(low)
                refused.append(low - 1)
                if "power of 2" in text:
                    accepted.append(2 * low)
                    refused.append(low * 3 // 2)
            elif m := CHOICES.search(without_parentheses(text)):
                stated = [c for c in m.group(1).split(" | ")
                          if c not in MACHINE and (path, param.opts[0], c) not in CONDITIONAL]
                accepted += stated
                if integer:
                    refused += [v for v in (0, 1, 2, 16, 32, 64) if str(v) not in stated]
                else:
                    refused.append("bogus")
            if accepted or refused:
                found.append(Claim(path, param.opts[0], accepted, refused, text))
    return found


def refused_for(claim: Claim, value, tmp_path: Path, config: Path) -> tuple[bool, str]:
    """Whether the command refuses `value` for the claim's option (one error line naming it, exit 2)."""
    base = [str(a).format(config=config) for a in BASE[claim.command]]
    base = [str(tmp_path / a) if a == "out" else a for a in base]
    args = [*claim.command.split(), *base, *CONTEXT.get(claim.flag, []), claim.flag, str(value)]
    result = CliRunner().invoke(app, args)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    names_it = any(claim.flag in line for line in errors)
    return result.exit_code == 2 and names_it, f"{' '.join(args)} -> {result.exit_code}: {result.output.strip()}"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_checkpoint

    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny") / "config.json"


def test_every_command_is_probed():
    probed = {c.command for c in claims()}
    assert probed <= set(BASE), sorted(probed - set(BASE))
    flags = {c.flag for c in claims()}
    # the ranges and choices named in issue reports, and those declared outside the options schema
    assert {"--slice", "--compression", "--target-ratio", "--recover-lr", "--block-size", "--residual-bits",
            "--quantize", "--dtype", "--provider", "--exporter"} <= flags, sorted(flags)


@pytest.mark.parametrize("claim", claims(), ids=lambda c: f"{c.command}{c.flag}")
def test_stated_ranges_and_choices_are_what_the_command_accepts(claim, tmp_path, config):
    for value in claim.accepted:
        refused, how = refused_for(claim, value, tmp_path, config)
        assert not refused, f"help: {claim.help!r}\nstated as allowed, refused: {how}"
    for value in claim.refused:
        refused, how = refused_for(claim, value, tmp_path, config)
        assert refused, f"help: {claim.help!r}\nstated as not allowed, accepted: {how}"
