"""Typer parameters generated from an options schema (toolchain/compress/options.py), so a command
shows every option of the schema with the schema's flags, default and help, and no command
re-declares one."""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import MISSING
from typing import Optional

import typer

from toolchain.compress.options import help_text, option_fields


def _parameter(f, types: dict) -> inspect.Parameter:
    spec = f.metadata["option"]
    default = ... if f.default is MISSING else f.default
    kind = spec.cli_type or types[f.name]
    annotation = Optional[kind] if f.default is None else kind
    flags = spec.flags or ("--" + f.name.replace("_", "-"),)
    return inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation,
                             default=typer.Option(default, *flags, help=help_text(spec)))


def schema_options(schema: type, into: str = "options"):
    """Decorate a typer command so that it takes every command-line option of `schema` and receives
    their values, parsed into the schema's types, as one dict in its keyword `into`. `--help` lists
    the schema's required options, then the command's own, then the schema's others."""
    specs = [f for f in option_fields(schema) if f.metadata["option"].cli]

    def decorate(command):
        signature = inspect.signature(command)
        own = [p for name, p in signature.parameters.items() if name != into]
        clash = {f.name for f in specs} & {p.name for p in own}
        if clash:
            raise TypeError(f"{command.__name__} declares schema options itself: {', '.join(sorted(clash))}")
        types = typing.get_type_hints(schema)
        required = [_parameter(f, types) for f in specs if f.default is MISSING and f.default_factory is MISSING]
        optional = [_parameter(f, types) for f in specs if not (f.default is MISSING and f.default_factory is MISSING)]
        generated = required + optional

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {}
            for f in specs:
                value = kwargs.pop(f.name)
                parse = f.metadata["option"].parse
                values[f.name] = parse(value) if parse is not None and value is not None else value
            return command(**kwargs, **{into: values})

        # typer reads the parameters from the signature and their types from the annotations
        wrapper.__signature__ = signature.replace(parameters=required + own + optional)
        wrapper.__annotations__ = {**{p.name: p.annotation for p in generated},
                                   **{k: v for k, v in command.__annotations__.items() if k != into}}
        return wrapper

    return decorate
