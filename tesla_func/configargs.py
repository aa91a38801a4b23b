"""Frozen config dataclasses: their validation helpers, and argparse flags made from their fields.

Every field of a config becomes a flag: ``lr_img`` -> ``--lr-img``; a field holding another config
nests with a dot: ``distill.lr_img`` -> ``--distill.lr-img``, or ``--lr-img`` where the caller
flattens it. Booleans take ``--flag/--no-flag`` (``argparse.BooleanOptionalAction``, never
``type=bool``), tuples take several values, ``None`` defaults parse by the field's annotation,
dicts take JSON. Unset flags keep the base config's
value, so a command line only ever *builds a config*.

Each flag's help is the field's own comment in the class source (the comment lines just above the
field and the one at the end of its line), so a config documents its fields once, in one place,
and ``--help`` reads as that documentation. A comment must therefore stay above its field or on
its line: lines below a field's line belong to the next field. A field made with :func:`choice`
lists its choices in the help; a field whose default is None shows no "(default: None)" when its
comment says what None means or that it is required.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import json
import math
import textwrap
import tokenize
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

Config = TypeVar("Config")


# ----------------------------------------------------------------------------------------------
# Validation helpers for __post_init__: each raises ValueError naming Config.field and the rule.


def check_int(config: object, *names: str, low: int = 1, optional: bool = False) -> None:
    """Each named field must be an int >= ``low`` (bools are refused); ``optional``: or None."""
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            rule = "a positive int" if low == 1 else f"an int >= {low}"
            raise ValueError(f"{type(config).__name__}.{name} must be "
                             f"{'None or ' if optional else ''}{rule}, got {value!r}")


def check_non_negative(config: object, names: tuple[str, ...]) -> None:
    """Each named field must be a finite number >= 0."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"{type(config).__name__}.{name} must be finite and >= 0, got {value!r}"
            )


def check_choice(config: object, name: str, choices: object, why: str = "") -> None:
    """The named field must be one of ``choices`` (any container: a registry dict works);
    ``why`` is added to the message."""
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{type(config).__name__}.{name} {value!r} is unknown; known: "
                         f"{sorted(choices)}{why}")


def choice(default: Any, choices: Collection, why: str = "") -> Any:
    """A config field whose value must be one of ``choices`` (a tuple, or a registry dict read
    when checked, so entries added later count); a tuple field: each of its values. Its flag's
    help lists them, :func:`check_choices` checks them (a None default also allows None), and
    ``why`` ends the error message."""
    return dataclasses.field(default=default, metadata={"choices": choices, "why": why})


def check_choices(config: object) -> None:
    """Check every :func:`choice` field of ``config``."""
    for field in dataclasses.fields(config):
        if "choices" not in field.metadata:
            continue
        value = getattr(config, field.name)
        if value is None and field.default is None:
            continue
        why = field.metadata["why"]
        if isinstance(value, tuple):
            for item in value:
                if item not in field.metadata["choices"]:
                    raise ValueError(f"{type(config).__name__}.{field.name} holds {item!r}, "
                                     f"unknown; known: {sorted(field.metadata['choices'])}{why}")
        else:
            check_choice(config, field.name, field.metadata["choices"], why)


# ----------------------------------------------------------------------------------------------
# Field documentation, read from the class source.


@functools.cache
def field_comments(cfg_type: type) -> dict[str, str]:
    """``{field: its comment}`` from the source of ``cfg_type`` (empty where the source is gone).

    The comment of a field is the run of ``#`` lines right above it plus the ``#`` comment at the
    end of its own line.
    """
    try:
        source = textwrap.dedent(inspect.getsource(cfg_type))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}  # line number -> comment text
    own_line: set[int] = set()  # lines holding only a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[: tok.start[1]].strip():
                own_line.add(tok.start[0])
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, line = [], node.lineno - 1
            while line in own_line:
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[node.end_lineno]] if node.end_lineno not in own_line and (
                node.end_lineno in comments) else []
            text = " ".join(above + trailing)
            if text:
                out[node.target.id] = text
    return out


# ----------------------------------------------------------------------------------------------
# Flags.


def _is_config(value: object) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _int_or_word(text: str) -> int | str:
    """An ``int | str`` field's flag (``--keep-graphs auto|K``): a whole number, else the word as
    typed (the config's own check says which words it takes)."""
    try:
        return int(text)
    except ValueError:
        return text


def _parser_for(annotation: str, default: object) -> Any:
    """The argparse ``type`` for a field: from its default, else from its annotation."""
    if isinstance(default, dict) or annotation.startswith(("Mapping", "dict")):
        return json.loads
    if annotation.replace(" ", "") in ("int|str", "str|int"):
        return _int_or_word
    if default is not None and not isinstance(default, tuple):
        return type(default)
    text = annotation.removeprefix("tuple[")
    return int if text.startswith("int") else float if text.startswith("float") else str


def flag_help(doc: str, default: object, choices: Collection | None = None) -> str:
    """A flag's help: the field's comment, its choices, and its default, unless the default is
    None and the comment says what None means or that the field is required."""
    parts = [doc] if doc else []
    if choices is not None:
        parts.append(f"(one of: {', '.join(map(str, choices))})")
    if not (default is None and ("None" in doc or "(required)" in doc)):
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else repr(default)
        parts.append(f"(default: {shown})")
    return " ".join(parts).replace("%", "%%")  # argparse formats help with %


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cfg_type: type,
    skip: tuple[str, ...] = (),
    *,
    base: object | None = None,
    prefix: str = "",
    flatten: tuple[str, ...] = (),
    aliases: Mapping[str, tuple[str, ...]] | None = None,
    flag_prefix: str | None = None,
) -> None:
    """One flag per field of ``cfg_type`` (nested configs with ``--<field>.<subfield>``).

    ``base`` supplies the defaults shown in the help (default: ``cfg_type()``); flags default to
    None, meaning 'not given'. ``skip`` names fields (``"distill.seed"`` for nested ones) that get
    no flag. ``flatten`` names nested configs whose fields get bare flags (``"distill"``:
    ``--ipc`` sets ``distill.ipc``; a name both configs have must be skipped in one of them).
    ``aliases`` maps a field to further flags of its own (``{"methods": ("--method",)}``).
    ``config_from_args`` reads all of them back; it needs neither option. (``flag_prefix``: the
    flags' spelling of ``prefix``, for nested calls.)
    """
    base = base if base is not None else cfg_type()
    flag_prefix = prefix if flag_prefix is None else flag_prefix
    docs = field_comments(cfg_type)
    for field in dataclasses.fields(cfg_type):
        name = prefix + field.name
        if name in skip:
            continue
        value = getattr(base, field.name)
        if _is_config(value):
            nested_flags = flag_prefix if name in flatten else flag_prefix + field.name + "."
            add_config_arguments(parser, type(value), skip, base=value, prefix=name + ".",
                                 flatten=flatten, aliases=aliases, flag_prefix=nested_flags)
            continue
        flag = flag_prefix + field.name
        flags = ["--" + flag.replace("_", "-"), *(aliases or {}).get(name, ())]
        hint = flag_help(docs.get(field.name, ""), value, field.metadata.get("choices"))
        annotation = str(field.type)
        if isinstance(value, bool) or annotation.startswith("bool"):
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=hint)
        elif isinstance(value, tuple) or annotation.startswith("tuple"):
            parser.add_argument(*flags, dest=name, nargs="+", type=_parser_for(annotation, value),
                                default=None, metavar=flag.upper(), help=hint)
        else:
            parser.add_argument(*flags, dest=name, type=_parser_for(annotation, value),
                                default=None, metavar=flag.upper(), help=hint)


def config_from_args(
    args: argparse.Namespace, cfg_type: type[Config], base: Config | None = None, prefix: str = ""
) -> Config:
    """``base`` (default: ``cfg_type()``) with the fields given on the command line replaced,
    nested configs included."""
    base = base if base is not None else cfg_type()
    changes = {}
    for field in dataclasses.fields(cfg_type):
        name = prefix + field.name
        current = getattr(base, field.name)
        if _is_config(current):
            nested = config_from_args(args, type(current), current, prefix=name + ".")
            if nested != current:
                changes[field.name] = nested
            continue
        value = getattr(args, name, None)
        if value is not None:
            changes[field.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(base, **changes)
