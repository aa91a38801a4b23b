"""Frozen config dataclasses <-> argparse flags: every field becomes ``--field-name``.

Booleans take ``--flag/--no-flag`` (``argparse.BooleanOptionalAction``, never ``type=bool``),
tuples take several values, ``None`` defaults take a string. Unset flags keep the base config's
value, so a CLI only ever *builds a config*.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

Config = TypeVar("Config")


def add_config_arguments(
    parser: argparse.ArgumentParser, cfg_type: type, skip: tuple[str, ...] = ()
) -> None:
    """One flag per field of ``cfg_type`` (defaults None: 'not given')."""
    defaults = cfg_type()
    for field in dataclasses.fields(cfg_type):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        value = getattr(defaults, field.name)
        hint = f"default: {value!r}"
        if isinstance(value, bool) or str(field.type).startswith("bool"):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=hint
            )
        elif isinstance(value, tuple):
            kind = type(value[0]) if value else str
            parser.add_argument(flag, nargs="+", type=kind, default=None, help=hint)
        else:
            kind = type(value) if value is not None else _none_type(field.type)
            parser.add_argument(flag, type=kind, default=None, help=hint)


def _none_type(annotation: Any) -> type:
    """The parser for a field whose default is None, from its annotation ('int | None' -> int)."""
    text = str(annotation)
    return int if text.startswith("int") else float if text.startswith("float") else str


def config_from_args(
    args: argparse.Namespace, cfg_type: type[Config], base: Config | None = None
) -> Config:
    """``base`` (default: ``cfg_type()``) with the fields given on the command line replaced."""
    base = base if base is not None else cfg_type()
    changes = {}
    for field in dataclasses.fields(cfg_type):
        value = getattr(args, field.name, None)
        if value is not None:
            changes[field.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(base, **changes)
