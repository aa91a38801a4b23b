"""Config files: ``--config FILE.toml`` on every command and experiment, and the ``config.toml``
every run folder keeps.

**Reading** (:func:`parse_args`, with :func:`add_config_file_argument` on the parser): a key of the
file is an option's name, as its flag spells it without the dashes (``lr-img`` or ``lr_img``), or
as the config nests it (a ``[distill]`` table holding ``lr_img``, or the dotted key
``distill.lr_img``). Each value gets the check the flag gives its text: its type (an integer for
an int option, a number for a float one, ``true``/``false`` for a switch, an array for an option
taking several values, a table for a JSON one) and its choices. The values then stand in for the
options' defaults, so a flag given on the command line wins, and the command builds and validates
its config from them exactly as from flags. An unknown key is an error naming it and the keys
known there. The file is TOML, read by the standard library's ``tomllib`` (``tomli`` on Python
3.10).

**Writing** (:func:`to_toml`, :func:`write_config_toml`): a config's ``to_dict()`` as TOML, nested
configs as tables; ``inf`` and ``nan`` as TOML writes them, tuples as arrays, and a ``None`` value
left out (TOML has no null, and neither do the flags: a key left out keeps the field's default,
which is None for every field of the library's configs that can be None; a test checks it). A
run folder's ``config.toml`` is read back by ``--config``: ``tesla-func distill --config
run/config.toml --out run2`` distils the same set again (bitwise on CPU, with the same threads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover (the project's CI runs 3.11)
    import tomli as tomllib

from tesla_func.fileio import atomic_write_text

CONFIG_TOML = "config.toml"  # a run folder's config, as --config reads it
_DEST = "config"  # the option's own name: not a key of the file


class ConfigFileError(ValueError):
    """A config file that cannot be read, or a key or value in it that the options refuse."""


# ----------------------------------------------------------------------------------------------
# Writing


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:  # TOML forbids them raw
            out.append(f"\\u{ord(ch):04x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            raise ValueError(f"{text!r} holds a lone surrogate, which TOML (UTF-8) cannot hold")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"TOML keys are strings, got {type(key).__name__} {key!r}")
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _value(value: object) -> str:
    """One value, inline: bool, int, float (inf, nan), str, array, inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # the shortest text that reads back as the same float
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        if any(v is None for v in value):
            raise ValueError(f"cannot write {value!r} as TOML: an array cannot hold None")
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()
                               if v is not None) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _table(table: Mapping[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    own = [(k, v) for k, v in table.items() if v is not None and not isinstance(v, Mapping)]
    subtables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    if path and (own or not subtables):  # (an empty table still needs its header)
        lines.append(f"[{'.'.join(_key(p) for p in path)}]")
    lines.extend(f"{_key(k)} = {_value(v)}" for k, v in own)
    for k, v in subtables:
        if lines:
            lines.append("")
        _table(v, (*path, k), lines)


def to_toml(table: Mapping[str, Any], comment: str = "") -> str:
    """``table`` (a config's ``to_dict()``) as a TOML document; ``comment`` lines go on top.

    Nested mappings become tables (``[distill]``), lists and tuples arrays; ``None`` values are
    left out. Raises TypeError for a value of another type, ValueError for None in an array.
    """
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    _table(table, (), lines)
    return "\n".join(lines) + "\n"


def write_config_toml(path: str | Path, config: Mapping[str, Any], comment: str = "") -> Path:
    """Write ``config`` (a config's ``to_dict()``) to ``path`` as TOML, atomically."""
    atomic_write_text(path, to_toml(config, comment))
    return Path(path)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file ``path`` as a dict. Raises ConfigFileError naming the file when it is
    missing or not TOML."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigFileError(f"config file {path} is not TOML: {err}") from err


# ----------------------------------------------------------------------------------------------
# Reading into a command line


def add_config_file_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--config FILE.toml`` option (read by :func:`parse_args`)."""
    parser.add_argument(
        "--config", dest=_DEST, metavar="FILE.toml", default=None,
        help="read options from this TOML file: keys are the options' names (lr_img or lr-img; "
             "a nested config's fields in its table, e.g. [distill]), checked as the flags are; "
             "flags given here win (a run folder's config.toml reruns the run)")


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    sub = _subparsers(parser)
    for child in (sub.choices.values() if sub is not None else ()):
        yield from _all_parsers(child)


@contextlib.contextmanager
def _nothing_required(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Every option and group of ``parser`` and its subcommands optional for the block: the
    first pass reads ``--config`` from a command line that may leave to the file what is
    required."""
    saved = []
    for p in _all_parsers(parser):
        for holder in (*p._actions, *p._mutually_exclusive_groups):
            saved.append((holder, holder.required))
            holder.required = False
    try:
        yield
    finally:
        for holder, required in saved:
            holder.required = required


def _chosen(parser: argparse.ArgumentParser, known: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the subcommand ``known`` names (the parser itself without subcommands)."""
    sub = _subparsers(parser)
    if sub is None:
        return parser
    name = getattr(known, sub.dest, None)
    return _chosen(sub.choices[name], known) if name in sub.choices else parser


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Key -> option: each option's dest (``distill.lr_img``) and its long flags without the
    dashes (``lr_img`` where the flag is ``--lr-img``; not the ``--no-`` half of a switch)."""
    names: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in (argparse.SUPPRESS, "help", _DEST):
            continue
        names[action.dest] = action
        negated = isinstance(action, argparse.BooleanOptionalAction)
        for flag in action.option_strings:
            if flag.startswith("--") and not (negated and flag.startswith("--no-")):
                names.setdefault(flag[2:].replace("-", "_"), action)
    return names


def _typed(value: object, action: argparse.Action, key: str) -> object:
    """One value as the option's ``type`` would give it from text; ConfigFileError if not."""
    flag = action.option_strings[-1] if action.option_strings else action.dest
    kind = action.type
    if kind is int:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif kind is float:
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif kind in (None, str):
        ok, want = isinstance(value, str), "a string"
    elif kind is json.loads:
        ok, want = isinstance(value, dict), "a table"
    elif isinstance(value, str):  # any other type parses text, as it parses the flag's
        try:
            value, ok = kind(value), True
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise ConfigFileError(f"key {key!r}: {err}") from err
    else:
        ok, want = False, "a string"
    if not ok:
        raise ConfigFileError(f"key {key!r} must be {want} (as {flag} takes), "
                              f"got {type(value).__name__} {value!r}")
    if action.choices is not None and value not in action.choices:
        raise ConfigFileError(f"key {key!r}: {value!r} is not one of "
                              f"{', '.join(map(repr, action.choices))}")
    return value


def _checked(value: object, action: argparse.Action, key: str) -> object:
    """``value`` of ``key`` as the option ``action`` would store it."""
    if isinstance(action, argparse.BooleanOptionalAction) or (
            action.nargs == 0 and isinstance(action.const, bool)):
        if not isinstance(value, bool):
            raise ConfigFileError(f"key {key!r} is a switch: true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        if not isinstance(value, list):
            raise ConfigFileError(f"key {key!r} takes an array (several values), got {value!r}")
        if action.nargs == "+" and not value:
            raise ConfigFileError(f"key {key!r} needs at least one value")
        return [_typed(v, action, key) for v in value]
    return _typed(value, action, key)


def _values(table: Mapping[str, Any], options: dict[str, argparse.Action], prefix: str = "",
            found: dict[str, object] | None = None) -> dict[str, object]:
    """dest -> checked value for every key of ``table`` (nested tables under ``prefix``)."""
    found = {} if found is None else found
    for raw, value in table.items():
        key = prefix + raw.replace("-", "_")
        if key in options:
            dest = options[key].dest
            if dest in found:
                raise ConfigFileError(f"key {key!r} sets {dest!r}, which another key sets too")
            found[dest] = _checked(value, options[key], key)
        elif isinstance(value, dict) and any(k.startswith(key + ".") for k in options):
            _values(value, options, key + ".", found)
        else:
            known = sorted({k[len(prefix):].split(".")[0] + ("." if "." in k[len(prefix):] else "")
                            for k in options if k.startswith(prefix)})
            where = f" in [{prefix[:-1]}]" if prefix else ""
            raise ConfigFileError(
                f"unknown key {key!r}; the keys known{where} are: "
                + ", ".join(k.rstrip(".") + (" (a table)" if k.endswith(".") else "")
                            for k in known))
    return found


def config_file_values(parser: argparse.ArgumentParser, path: str | Path) -> dict[str, object]:
    """The options the TOML file ``path`` sets for ``parser``: dest -> value as the flag would
    store it. Raises ConfigFileError naming the file and the key."""
    try:
        return _values(read_toml(path), _options(parser))
    except ConfigFileError as err:
        message = str(err)
        raise ConfigFileError(message if message.startswith("config file") else
                              f"config file {path}: {message}") from None


def parse_args(parser: argparse.ArgumentParser,
               argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with the options of a ``--config FILE.toml`` given there.

    The file's values replace the options' defaults (and make the options they set no longer
    required), so anything given on the command line wins, in a group of exclusive options too
    (``--random-real 10`` drops the file's ``synthetic``). Errors in the file end the program as
    a bad flag does (status 2, the message names the file and the key).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:  # (help shows what is required: no first pass)
        return parser.parse_args(argv)
    with _nothing_required(parser):
        known, _ = parser.parse_known_args(argv)
    path = getattr(known, _DEST, None)
    if path is None:
        return parser.parse_args(argv)
    target = _chosen(parser, known)
    try:
        values = config_file_values(target, path)
    except ConfigFileError as err:
        target.error(str(err))
    actions = {a.dest: a for a in target._actions if a.dest in values}
    saved = [(a, a.default, a.required) for a in actions.values()]
    groups = [(g, g.required) for g in target._mutually_exclusive_groups]
    try:
        for dest, action in actions.items():
            action.default, action.required = values[dest], False
        for group, _ in groups:
            group.required = group.required and not any(a.dest in values
                                                         for a in group._group_actions)
        args = parser.parse_args(argv)
        for group, _ in groups:  # an exclusive option given here drops the file's others
            given = [a for a in group._group_actions if getattr(args, a.dest, None)
                     not in (None, a.default)]
            if given:
                for a in group._group_actions:
                    if a not in given and a.dest in values:
                        setattr(args, a.dest, next(d for b, d, _ in saved if b is a))
    finally:
        for action, default, required in saved:
            action.default, action.required = default, required
        for group, required in groups:
            group.required = required
    return args
