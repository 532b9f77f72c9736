"""Typed settings: one loader for ``params.yaml`` sections, ``--set KEY=VALUE`` overrides and the
command-line flags of the jobs, all checked against the fields of a dataclass.

The dataclass of a section is the one place its defaults live; ``params.yaml`` repeats them for DVC
(a test keeps the two equal) and the job CLIs take theirs from the dataclass. YAML is read as
YAML 1.2 reads numbers (``1e-3`` is a float, as DVC reads the same file), and every value is
checked against its field's type, with an error that names the key, the value and the type.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Mapping, NoReturn, Sequence, TypeVar

import yaml

T = TypeVar("T")


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-3`` and ``1E5`` are numbers, not strings."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
                   |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


class SettingError(ValueError, TypeError):
    """A value that setting ``key`` cannot take; ``problem`` says what is wrong and what it may be
    (``must be at least 1``). Its text names the key (``num_steps=0 must be at least 1``, or
    ``text`` as given); a command's parser names the flag or the params file entry the value came
    from instead (``CommandParser.refusing``), the served model the column. A TypeError too: a
    value of the wrong type is one."""

    def __init__(self, key: str, value: Any, problem: str, text: str | None = None):
        self.key, self.value, self.problem = key, value, problem
        super().__init__(text or f"{key}={value!r} {problem}")

    @property
    def field(self) -> str:
        """The key without its section (``sample.num_steps`` -> ``num_steps``)."""
        return self.key.rpartition(".")[2]


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p.absolute()} not found: run from the project root or pass --params")
    return load_yaml(p.read_text()) or {}


def read_section(path: str | Path, section: str) -> dict[str, Any]:
    params = read_yaml(path)
    if section not in params:
        raise KeyError(f"{path} has no section {section!r}; add it (see params.yaml in the repository)")
    return dict(params[section] or {})


# ---------------------------------------------------------------------------------------------
# Type checking against a dataclass field
# ---------------------------------------------------------------------------------------------

def type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _options(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    return typing.get_args(tp) if origin in (typing.Union, types.UnionType) else (tp,)


class _Mismatch(Exception):
    pass


def _coerce_one(value: Any, tp: Any) -> Any:
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple, Sequence):
        if isinstance(value, str) and "," in value:     # a comma-separated command-line value
            value = [load_yaml(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        item = args[0] if args else Any
        return [_coerce(v, item) for v in value]
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():   # 1e3 written for 1000
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(value, tp):
        return value
    raise _Mismatch


def _coerce(value: Any, tp: Any) -> Any:
    options = _options(tp)
    for option in options:
        try:
            return _coerce_one(value, option)
        except _Mismatch:
            continue
    # a single value where only a list fits: a one-element list (`--formats png`)
    for option in options:
        if typing.get_origin(option) in (list, tuple) and not isinstance(value, (list, tuple, dict)):
            try:
                return _coerce_one([value], option)
            except _Mismatch:
                continue
    raise _Mismatch


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as field type ``tp`` (an int for a float field, a comma-separated string for a
    list), or a TypeError naming ``key``, the value and the type."""
    try:
        return _coerce(value, tp)
    except _Mismatch:
        problem = f"({type_name(type(value))}) is not a valid {type_name(tp)}"
        raise SettingError(key, value, problem, f"{key}={value!r} {problem}; fix the value in params.yaml or the override") from None


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def defaults(cls: type) -> dict[str, Any]:
    """The defaults of a settings dataclass (fields without one are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def build(cls: type[T], values: Mapping[str, Any], section: str, ignore: Sequence[str] = ()) -> T:
    """An instance of ``cls`` from ``values`` (a params section, overrides, ...): unknown keys,
    missing required fields and values of the wrong type are refused, naming ``section.key``.
    Keys in ``ignore`` belong to the stage, not to ``cls``, and are skipped."""
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names) - set(ignore))
    if unknown:
        raise ValueError(f"unknown {section} settings {unknown}; known: {sorted(set(names) | set(ignore))}")
    kwargs = {k: coerce(v, hints[k], f"{section}.{k}") for k, v in values.items() if k in names}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{section} settings lack {missing}")
    return cls(**kwargs)


def read_value(text: str, tp: Any) -> Any:
    """A command-line value for a field of type ``tp``: read as YAML 1.2 (``1e-3``, ``null``,
    ``[1, 2]``), except that a text field keeps the text as typed (``name=123`` is "123")."""
    value = load_yaml(text) if text.strip() else ""
    if str in _options(tp) and value is not None and not isinstance(value, str):
        try:
            _coerce(value, tp)
        except _Mismatch:
            return text
    return value


def parse_overrides(items: Sequence[str], cls: type, section: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings, each KEY a field of ``cls``, each VALUE read by ``read_value``."""
    hints = field_types(cls)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(f"--set {item}: expected KEY=VALUE with KEY one of {sorted(hints)} ({section} settings)")
        out[key] = read_value(value, hints[key])
    return out


# ---------------------------------------------------------------------------------------------
# Command-line flags from a dataclass
# ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (),
                  help: Mapping[str, str] | None = None) -> None:
    """One ``--field-name VALUE`` flag per field of ``cls`` (except ``skip``), its default the
    dataclass's (shown in ``--help``); values are read as YAML and type-checked by ``from_args``."""
    hints, dflt = field_types(cls), defaults(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        shown = dflt.get(f.name, "required")
        text = (help or {}).get(f.name, "")
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS, metavar=type_name(hints[f.name]).upper(),
                            help=f"{text or 'the setting ' + f.name} (default: {shown})")


def from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags of ``add_arguments`` that were given, each read by ``read_value``."""
    hints, given = field_types(cls), vars(args)
    return {name: read_value(given[name], tp) for name, tp in hints.items() if isinstance(given.get(name), str)}


# ---------------------------------------------------------------------------------------------
# One command line for every job and stage: --params, --set and the settings list in --help
# ---------------------------------------------------------------------------------------------

def summary(doc: str | None) -> str:
    """A module docstring's first paragraph, whole: a command's description (its first line alone
    would cut a sentence that goes on to the next line)."""
    return (doc or "").strip().split("\n\n")[0]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's, with the description and epilog kept as written and the flags' help wrapped at
    spaces only: a value such as ``dpm-solver++`` or an s3:// URI is never split at its hyphen."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


class CommandParser(argparse.ArgumentParser):
    """argparse's parser for a command a person types: an error is one line on stderr (exit status
    2, no usage block, no traceback), and ``refusing`` turns a refused value into such a line that
    names where the value came from: the flag (``--num-steps 0``), ``--set KEY=VALUE``, or the
    entry of the params file."""

    section: str = ""          # the params.yaml section of its settings (add_settings_arguments)
    keys: tuple[str, ...] = ()  # the names of those settings

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see {self.prog} --help)\n")

    def origin(self, key: str, args: argparse.Namespace) -> str | None:
        """How the user gave setting ``key``: its flag, a --set item, the params file (None: not at all)."""
        flags = [a.option_strings[-1] for a in self._actions if a.dest == key and a.option_strings]
        given = vars(args)
        if flags and isinstance(given.get(key), str):
            return f"{flags[0]} {given[key]}"
        for item in given.get("set") or []:
            if item.partition("=")[0] == key:
                return f"--set {item}"
        if self.section and (given.get("params") or Path("params.yaml").is_file()):
            return f"{self.section}.{key} in {given.get('params') or 'params.yaml'}"
        return None

    def named(self, text: str, args: argparse.Namespace) -> str:
        """A settings check's message (``train.steps=0 must be ...``) led by where the value came from."""
        match = re.match(r"(?:\w+\.)?(\w+)=", text)
        where = self.origin(match.group(1), args) if match and match.group(1) in self.keys else None
        return f"{where}: {text}" if where else text

    @contextlib.contextmanager
    def refusing(self, args: argparse.Namespace, values: Mapping[str, str] | None = None,
                 flag: str | None = None) -> Iterator[None]:
        """Values refused inside the block become ``error`` lines: a ``SettingError`` names the flag
        (or params entry) it came from, ``values`` giving the flags of keys that are not settings
        (``{"class_label": "--labels 3,7"}``); any other ValueError, TypeError, missing file or
        exit message is its text, after ``flag`` (the flag whose value the block reads)."""
        lead = f"{flag}: " if flag else ""
        try:
            yield
        except SettingError as e:
            listed = (values or {}).get(e.field)    # a flag of several values (or a params entry): say which value
            where = listed or self.origin(e.field, args)
            if not where:
                self.error(lead + str(e))
            shown = "" if where.startswith("--") and not listed else f"{e.value!r} "
            self.error(f"{where}: {shown}{e.problem}")
        except (ValueError, TypeError, FileNotFoundError, PermissionError) as e:
            self.error(lead + self.named(str(e), args))
        except KeyError as e:
            self.error(lead + (e.args[0] if e.args else repr(e)))
        except SystemExit as e:      # a check that exits with its message
            if not isinstance(e.code, str):
                raise
            self.error(lead + self.named(e.code, args))


def command_parser(doc: str | None, prog: str | None = None) -> CommandParser:
    """A job's or stage's parser: its docstring's first paragraph as written, the epilog (the
    settings list) kept line by line."""
    return CommandParser(prog=prog, description=summary(doc), formatter_class=HelpFormatter)


def settings_listing(cls: type, section: str, skip: Sequence[str] = ()) -> str:
    """``settings (params.yaml section ...):`` and one ``name (type): default`` line per field of
    ``cls``; fields in ``skip`` come from the command's own flags (--out, --latents, ...), not from params."""
    hints, dflt = field_types(cls), defaults(cls)
    lines = [f"settings (params.yaml section `{section}`; change them with --params FILE or --set KEY=VALUE),",
             f"with their defaults (from {cls.__module__}.{cls.__qualname__}):"]
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            lines.append(f"  {f.name} ({type_name(hints[f.name])}): {dflt.get(f.name, 'required')}")
    return "\n".join(lines)


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type, section: str, params_default: str | None,
                           skip: Sequence[str] = (), example: str = "") -> None:
    """``--params`` and ``--set`` for the settings dataclass ``cls`` (params.yaml section
    ``section``), and the list of its settings with their defaults at the end of ``--help``.
    ``params_default`` None: ./params.yaml when the working directory has one, else the defaults."""
    where = params_default or "./params.yaml if present, else the defaults listed below"
    parser.add_argument("--params", default=params_default, metavar="FILE",
                        help=f"YAML file whose `{section}` section gives the settings (default: {where})")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"override {section} settings, values typed as in params.yaml{', e.g. ' + example if example else ''}")
    parser.epilog = settings_listing(cls, section, skip)
    if isinstance(parser, CommandParser):
        parser.section, parser.keys = section, tuple(field_types(cls))


def read_settings(args: argparse.Namespace, cls: type, section: str) -> dict[str, Any]:
    """The section that ``--params`` names (None: ./params.yaml if present, else nothing), with the
    ``--set`` overrides on top, each checked against ``cls``."""
    path = args.params or ("params.yaml" if Path("params.yaml").is_file() else None)
    params = read_section(path, section) if path else {}
    return {**params, **parse_overrides(args.set, cls, section)}


__all__ = ["CommandParser", "HelpFormatter", "SettingError", "add_arguments", "add_settings_arguments", "build", "coerce", "command_parser", "defaults", "from_args", "load_yaml",
           "parse_overrides", "read_section", "read_settings", "read_value", "read_yaml", "settings_listing", "summary",
           "type_name"]
