"""Configuration: nested dataclasses + YAML files + dotted command-line overrides.

A run's configuration is a tree of dataclasses. Values come in layers, later layers
winning key by key:

1. the dataclass defaults;
2. an optional ``defaults`` mapping given by the program;
3. a YAML file (a nested mapping; a key may also be dotted, ``objective.alpha: 4``);
4. dotted overrides ``key.sub=value`` (from the command line).

Every value is checked and coerced against the field's annotation (resolved with
``typing.get_type_hints``, so ``from __future__ import annotations`` is fine):

* ``int``: ints, and floats with an integral value (``16.0``); never bools or strings.
* ``float``: ints and floats. Scientific notation without a dot (``1e-4``) is read as a
  number, in files and overrides alike (plain PyYAML would read a string).
* ``bool``: real booleans, or the YAML boolean words (true/false/yes/no/on/off); never
  ``0``/``1``.
* ``str``: strings. In an override the text after ``=`` is taken literally when YAML
  would read something else (``name=yes`` gives ``"yes"``, ``revision=1234`` gives
  ``"1234"``; an empty value gives ``""``); in a file, quote such strings.
* ``Optional[X]``/``X | None``: ``null`` (or ``~``) gives None, anything else is an X.
  Other unions try their members in order.
* ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``: YAML sequences; an override may also
  write ``a,b`` (split on commas, each item read as YAML) or ``a`` (one item).
* ``dict[K, V]``: YAML mappings. A file value replaces the whole dict; an override can
  set one entry with ``section.field.entry=value``.
* ``Literal[...]``: the value must be one of the choices.
* nested dataclasses: sections. A mapping merges into the section key by key; ``null``
  sets an ``Optional`` section to None (and is ignored for a non-optional section in a
  file, where an empty ``section:`` block is usual).
* ``Path`` and ``Enum`` subclasses (by value or name); ``Any`` passes values through.

Mistakes raise :class:`ConfigError` (a ``ValueError``) whose message names the full
dotted key, the expected type, the value received and where it came from (the YAML
file, or ``override 'a.b=c'``). An unknown key lists the valid keys at its level with
a "did you mean" suggestion.

After the tree is built, ``validate()`` is called on every dataclass in it that defines
one, children before parents; a ``ValueError`` it raises comes back as a
``ConfigError`` prefixed with that section's dotted path
(``objective: temperature must be > 0``).

Typical use::

    cfg = parse_cli(sys.argv[1:], TrainConfig)   # --config FILE.yaml a.b=c ...
    dump_config(cfg, out_dir / "config.yaml")    # load_config(TrainConfig, that) == cfg
"""
from __future__ import annotations

import collections.abc as cabc
import copy
import dataclasses
import datetime
import difflib
import enum
import functools
import re
import sys
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

__all__ = [
    "ConfigError",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "validate_config",
    "config_to_dict",
    "config_to_yaml",
    "dump_config",
    "parse_cli",
    "describe_config",
    "config_keys",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration mistake. ``key`` (dotted) and ``source`` are set when known."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        super().__init__(message)
        self.key = key
        self.source = source


# --------------------------------------------------------------------------- YAML

# YAML 1.2 reads 1e-4 as a float; PyYAML (YAML 1.1) insists on a dot and reads a string.
_FLOAT_NO_DOT = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_FLOAT_TAG = "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float and rejects duplicate mapping keys."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings _Loader would read as floats (e.g. "1e3")."""


for _c in (_Loader, _Dumper):
    _c.add_implicit_resolver(_FLOAT_TAG, _FLOAT_NO_DOT, list("-+0123456789."))


def _construct_mapping_no_duplicates(loader: _Loader, node: yaml.MappingNode) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<: *base" entries are meant to be overridden locally
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping_no_duplicates)

_YAML_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _read_yaml(path: str | Path) -> tuple[cabc.Mapping, str]:
    p = Path(path)
    source = str(p)
    if not p.exists():
        raise ConfigError(f"Config file not found: {source}", source=source)
    if not p.is_file():
        raise ConfigError(f"Config file is not a regular file: {source}", source=source)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"Cannot read config file {source}: {e}", source=source) from e
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"Invalid YAML in config file {source}: {e}", source=source) from e
    if data is None:  # empty file (or only comments): no settings
        return {}, source
    if not isinstance(data, cabc.Mapping):
        raise ConfigError(
            f"Config file {source} must hold a mapping of keys at the top level, "
            f"got {type(data).__name__}: {_short_repr(data)}", source=source)
    return data, source


# --------------------------------------------------------------------------- types

_NoneType = type(None)
_MISSING = object()  # no default: the key must be set somewhere
_SEQUENCES = (list, tuple, cabc.Sequence, cabc.MutableSequence)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "Any"
    if tp is _NoneType or tp is None:
        return "None"
    if _is_union(tp):
        args = get_args(tp)
        members = [a for a in args if a is not _NoneType]
        if len(members) == 1 and len(args) == 2:
            return f"Optional[{_type_name(members[0])}]"
        return " | ".join(_type_name(a) for a in args)
    origin = get_origin(tp)
    if origin is Literal:
        return "Literal[" + ", ".join(repr(a) for a in get_args(tp)) + "]"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        args = get_args(tp)
        if not args:
            return name
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_name(args[0])}, ...]"
        return f"{name}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def _section_type(tp: Any) -> type | None:
    """The dataclass of a section field (``Section`` or ``Optional[Section]``), else None."""
    if _is_dataclass_type(tp):
        return tp
    if _is_union(tp):
        members = [a for a in get_args(tp) if a is not _NoneType]
        if len(members) == 1 and _is_dataclass_type(members[0]):
            return members[0]
    return None


def _allows_none(tp: Any) -> bool:
    return tp is Any or tp is _NoneType or (_is_union(tp) and _NoneType in get_args(tp))


def _strip_optional(tp: Any) -> Any:
    if _is_union(tp):
        members = [a for a in get_args(tp) if a is not _NoneType]
        if len(members) == 1:
            return members[0]
    return tp


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """The settable (init) fields of a dataclass with their resolved annotations."""
    if not _is_dataclass_type(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:  # NameError for forward refs to names that are not global
        raise ConfigError(
            f"Cannot resolve the type annotations of {cls.__qualname__}: {e}. Config "
            f"dataclasses must be importable at module level.") from e
    return {f.name: (f, hints.get(f.name, Any)) for f in dataclasses.fields(cls) if f.init}


# --------------------------------------------------------------------------- errors

def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _from(source: str | None) -> str:
    return f" (from {source})" if source else ""


def _short_repr(value: Any, limit: int = 200) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _describe_value(value: Any) -> str:
    return f"{_short_repr(value)} ({type(value).__name__})"


def _mismatch(key: str, shown: Any, value: Any, source: str | None, detail: str = "") -> ConfigError:
    return ConfigError(
        f"Invalid value for '{key}'{_from(source)}: expected {_type_name(shown)}, "
        f"got {_describe_value(value)}{detail}", key=key, source=source)


def _unknown_key(cls: type, name: str, prefix: str, source: str | None) -> ConfigError:
    key = _join(prefix, name)
    valid = list(_fields(cls))
    msg = f"Unknown key '{key}'{_from(source)}."
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        msg += f" Did you mean '{_join(prefix, close[0])}'?"
    else:  # maybe the key belongs to a section below this level
        deeper = [k for k, _, _ in _walk_keys(cls, "") if k.rsplit(".", 1)[-1] == name]
        if deeper:
            msg += f" Did you mean '{_join(prefix, deeper[0])}'?"
    where = f"under '{prefix}'" if prefix else "at the top level"
    msg += f" Valid keys {where}: {', '.join(valid) if valid else '(none)'}."
    return ConfigError(msg, key=key, source=source)


def _prefixed(prefix: str, err: Exception) -> str:
    return f"{prefix}: {err}" if prefix else str(err)


# --------------------------------------------------------------------------- override values

class _Raw:
    """The text of an override value, read as YAML when (and if) needed."""

    __slots__ = ("text", "source", "_state", "_value")

    def __init__(self, text: str, source: str):
        self.text = text
        self.source = source
        self._state: bool | None = None  # None: not parsed, True: ok, False: failed
        self._value: Any = None

    def parse(self) -> tuple[bool, Any]:
        if self._state is None:
            try:
                self._value = yaml.load(self.text, Loader=_Loader)
                self._state = True
            except yaml.YAMLError as e:
                self._value = e
                self._state = False
        return self._state, self._value

    def value(self, key: str) -> Any:
        ok, value = self.parse()
        if not ok:
            first = str(value).strip().splitlines()[0] if str(value).strip() else type(value).__name__
            raise ConfigError(
                f"Invalid value for '{key}' (from {self.source}): cannot read "
                f"{self.text!r} as YAML ({first})", key=key, source=self.source) from value
        return value


def _takes_text(tp: Any) -> bool:
    """Whether an unparsable override text can still be a value of ``tp`` (a string)."""
    if tp is str or tp is Path or tp is PurePath:
        return True
    if _is_union(tp):
        return any(_takes_text(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return any(isinstance(c, str) for c in get_args(tp))
    return False


def _parse_override(text: Any) -> tuple[list[str], _Raw, str]:
    if not isinstance(text, str):
        raise ConfigError(f"Override must be a string 'key.sub=value', got {_describe_value(text)}")
    source = f"override '{text}'"
    if "=" not in text:
        raise ConfigError(
            f"Invalid override '{text}': expected 'key.sub=value' (missing '=')", source=source)
    key, value = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or not all(parts):
        raise ConfigError(
            f"Invalid override '{text}': the key {key!r} must be dotted names like "
            f"'section.field'", source=source)
    return parts, _Raw(value, source), source


# --------------------------------------------------------------------------- coercion

def _coerce(value: Any, tp: Any, key: str, source: str | None, shown: Any = None) -> Any:
    """``value`` as an instance of ``tp``, or a ConfigError naming ``key`` and ``source``.

    ``value`` may be a :class:`_Raw` override text; ``shown`` is the type named in
    errors (the declared type, when ``tp`` is a member of an Optional).
    """
    shown = tp if shown is None else shown
    raw = value if isinstance(value, _Raw) else None
    if raw is not None:
        ok, value = raw.parse()
        if not ok:
            if not _takes_text(tp):
                raw.value(key)  # raises the parse error
            value = raw.text
    passed = raw if raw is not None else value  # what to hand to a nested _coerce

    if tp is Any or tp is object:
        return value
    if tp is _NoneType:
        if value is None:
            return None
        raise _mismatch(key, shown, value, source)

    if _is_union(tp):
        args = get_args(tp)
        # An empty override value is "" / [] for the non-None member, not null.
        if value is None and not (raw is not None and raw.text.strip() == ""):
            if _NoneType in args:
                return None
            raise _mismatch(key, shown, value, source)
        members = [a for a in args if a is not _NoneType]
        if len(members) == 1:
            return _coerce(passed, members[0], key, source, shown)
        for m in members:  # an exact type match wins (e.g. 3 for float | int stays 3)
            if isinstance(m, type) and type(value) is m:
                return value
        for m in members:
            try:
                return _coerce(passed, m, key, source)
            except ConfigError:
                continue
        raise _mismatch(key, shown, value, source)

    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if type(value) is type(c) and value == c:
                return c
        if raw is not None and raw.text in choices:  # e.g. Literal["yes", "no"] and "no"
            return raw.text
        detail = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(
                value, [c for c in choices if isinstance(c, str)], n=1, cutoff=0.6)
            if close:
                detail = f". Did you mean {close[0]!r}?"
        raise _mismatch(key, shown, value, source, detail)

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _YAML_BOOLS:
            return _YAML_BOOLS[value.strip().lower()]
        raise _mismatch(key, shown, value, source, " (use true or false)")

    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        detail = " (not a whole number)" if isinstance(value, float) else ""
        raise _mismatch(key, shown, value, source, detail)

    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _mismatch(key, shown, value, source)

    if tp is str:
        if isinstance(value, str):
            return value
        if raw is not None:
            if value is None and raw.text.strip() != "":
                raise _mismatch(key, shown, value, source, " (null is not a string)")
            return raw.text  # name=yes, revision=1234, prompt=[x] are taken literally
        raise _mismatch(key, shown, value, source, " (quote it in YAML to make it a string)"
                        if isinstance(value, (bool, int, float, datetime.date)) else "")

    if tp is Path or tp is PurePath:
        if isinstance(value, PurePath):
            return Path(value)
        if isinstance(value, str):
            return Path(value)
        if raw is not None and value is not None:
            return Path(raw.text)
        raise _mismatch(key, shown, value, source)

    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if type(member.value) is type(value) and member.value == value:
                return member
        if isinstance(value, str) and value in tp.__members__:
            return tp[value]
        choices = ", ".join(repr(m.value) for m in tp)
        raise _mismatch(key, shown, value, source, f" (one of {choices})")

    if origin in _SEQUENCES or tp in (list, tuple):
        args = get_args(tp)
        if raw is not None and value is not None and not isinstance(
                value, (list, tuple, cabc.Mapping)):  # override: a,b,c or a single item
            text = raw.text
            items: list = [] if not text.strip() else [_Raw(p.strip(), raw.source)
                                                        for p in text.split(",")]
        elif raw is not None and value is None and raw.text.strip() == "":
            items = []
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise _mismatch(key, shown, value, source)
        is_tuple = origin is tuple or tp is tuple
        if is_tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if args == ((),):  # tuple[()]
                args = ()
            if len(items) != len(args):
                raise _mismatch(key, shown, [i.text if isinstance(i, _Raw) else i for i in items],
                                source, f" (needs exactly {len(args)} items)")
            return tuple(_coerce(it, a, f"{key}[{i}]", source)
                         for i, (it, a) in enumerate(zip(items, args)))
        elem = args[0] if args else Any
        out = [_coerce(it, elem, f"{key}[{i}]", source) for i, it in enumerate(items)]
        return tuple(out) if is_tuple else out

    if origin in _MAPPINGS or tp is dict:
        if not isinstance(value, cabc.Mapping):
            raise _mismatch(key, shown, value, source)
        args = get_args(tp)
        kt, vt = args if len(args) == 2 else (Any, Any)
        return {_coerce(k, kt, f"{key} (a key)", source): _coerce(v, vt, _join(key, str(k)), source)
                for k, v in value.items()}

    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, cabc.Mapping):
            values = _default_values(tp)
            _merge_mapping(tp, values, value, key, source)
            return _build(tp, values, key)
        raise _mismatch(key, shown, value, source, " (a section takes a mapping)")

    try:
        if isinstance(value, tp):
            return value
    except TypeError:
        return value  # an annotation we cannot check (TypeVar, ...): pass it through
    raise _mismatch(key, shown, value, source)


# --------------------------------------------------------------------------- value trees
#
# While layers are applied, a config is a nested dict of field values ("values"): a
# section field holds a nested values dict (or None), a leaf field its coerced value,
# and a field without a default _MISSING until some layer sets it.

def _default_values(cls: type, _stack: tuple = ()) -> dict:
    out: dict = {}
    for name, (f, tp) in _fields(cls).items():
        if f.default is not dataclasses.MISSING:
            v = f.default
        elif f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
        else:
            v = _MISSING
        sec = _section_type(tp)
        if sec is not None:
            if v is _MISSING and sec is tp and sec not in _stack:
                v = _default_values(sec, _stack + (cls,))  # required section: its defaults
            elif _is_dataclass_instance(v):
                v = _instance_values(v)
        elif v is not _MISSING:
            v = copy.deepcopy(v)
        out[name] = v
    return out


def _instance_values(obj: Any) -> dict:
    out: dict = {}
    for name, (_, tp) in _fields(type(obj)).items():
        v = getattr(obj, name)
        if _section_type(tp) is not None and _is_dataclass_instance(v):
            out[name] = _instance_values(v)
        else:
            out[name] = copy.deepcopy(v)
    return out


def _section_values(values: dict, name: str, sec: type) -> dict:
    cur = values.get(name)
    if not isinstance(cur, dict):  # None or _MISSING: start from the section's defaults
        cur = _default_values(sec)
        values[name] = cur
    return cur


def _merge_mapping(cls: type, values: dict, mapping: cabc.Mapping, prefix: str,
                   source: str | None) -> None:
    for k, v in mapping.items():
        if not isinstance(k, str):
            where = f"under '{prefix}'" if prefix else "at the top level"
            raise ConfigError(f"Invalid key {k!r} {where}{_from(source)}: keys must be strings",
                              key=prefix or None, source=source)
        parts = k.split(".")
        if not all(parts):
            raise ConfigError(f"Invalid key '{_join(prefix, k)}'{_from(source)}: empty name "
                              f"in a dotted key", key=_join(prefix, k), source=source)
        _assign(cls, values, parts, v, prefix, source)


def _set_nested(d: dict, parts: list[str], value: Any) -> None:
    for p in parts[:-1]:
        nxt = d.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            d[p] = nxt
        d = nxt
    d[parts[-1]] = value


def _assign(cls: type, values: dict, parts: list[str], value: Any, prefix: str,
            source: str | None) -> None:
    """Set the dotted key ``parts`` (relative to section ``cls`` at ``prefix``)."""
    name, rest = parts[0], parts[1:]
    fields = _fields(cls)
    if name not in fields:
        raise _unknown_key(cls, name, prefix, source)
    key = _join(prefix, name)
    tp = fields[name][1]
    sec = _section_type(tp)

    if sec is not None:
        if rest:
            _assign(sec, _section_values(values, name, sec), rest, value, key, source)
            return
        v = value.value(key) if isinstance(value, _Raw) else value
        if isinstance(v, cabc.Mapping):
            _merge_mapping(sec, _section_values(values, name, sec), v, key, source)
        elif v is None:
            if _allows_none(tp):
                values[name] = None
            elif isinstance(value, _Raw):
                raise _mismatch(key, tp, v, source, " (a section takes a mapping)")
            # else: an empty "section:" block in a file changes nothing
        elif isinstance(v, sec):
            values[name] = _instance_values(v)
        else:
            raise _mismatch(key, tp, v, source, " (a section takes a mapping)")
        return

    if rest:
        base = _strip_optional(tp)
        if base is Any or base is dict or get_origin(base) in _MAPPINGS:
            cur = values.get(name)
            d = copy.deepcopy(cur) if isinstance(cur, dict) else {}
            full = _join(key, ".".join(rest))
            _set_nested(d, rest, value.value(full) if isinstance(value, _Raw) else value)
            values[name] = _coerce(d, tp, key, source)
            return
        raise ConfigError(
            f"Cannot set '{_join(key, '.'.join(rest))}'{_from(source)}: '{key}' is a "
            f"{_type_name(tp)} value, not a section", key=key, source=source)

    values[name] = _coerce(value, tp, key, source)


def _apply_override_list(cls: type, values: dict, overrides: Any) -> None:
    if isinstance(overrides, str):
        overrides = (overrides,)
    for text in overrides or ():
        parts, raw, source = _parse_override(text)
        _assign(cls, values, parts, raw, "", source)


def _build(cls: type[T], values: dict, prefix: str) -> T:
    kwargs: dict = {}
    for name, (_, tp) in _fields(cls).items():
        key = _join(prefix, name)
        v = values.get(name, _MISSING)
        if v is _MISSING:
            raise ConfigError(f"Missing required key '{key}' (expected {_type_name(tp)})", key=key)
        sec = _section_type(tp)
        if sec is not None and isinstance(v, dict):
            v = _build(sec, v, key)
        kwargs[name] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # e.g. a check in __post_init__
        raise ConfigError(_prefixed(prefix, e), key=prefix or None) from e


def _finish(cls: type[T], values: dict) -> T:
    cfg = _build(cls, values, "")
    validate_config(cfg)
    return cfg


def _check_cls(cls: Any) -> None:
    if not _is_dataclass_type(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")


# --------------------------------------------------------------------------- public API

def validate_config(cfg: Any) -> None:
    """Call ``validate()`` on every dataclass in ``cfg``, children first, root last.

    A ``ValueError`` raised by a section's ``validate()`` is re-raised as a
    :class:`ConfigError` whose message is prefixed with the section's dotted path.
    """
    _validate(cfg, "")


def _validate(obj: Any, path: str) -> None:
    if _is_dataclass_instance(obj):
        for f in dataclasses.fields(obj):
            _validate(getattr(obj, f.name), _join(path, f.name))
        fn = getattr(obj, "validate", None)
        if callable(fn):
            try:
                fn()
            except ValueError as e:
                raise ConfigError(_prefixed(path, e), key=path or None) from e
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _validate(item, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _validate(v, _join(path, str(k)))


def config_from_dict(cls: type[T], mapping: cabc.Mapping | None, source: str = "<dict>") -> T:
    """Build ``cls`` from its defaults updated by a nested (or dotted-key) mapping."""
    _check_cls(cls)
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, cabc.Mapping):
        raise ConfigError(f"Config{_from(source)} must be a mapping, got "
                          f"{_describe_value(mapping)}", source=source)
    values = _default_values(cls)
    _merge_mapping(cls, values, mapping, "", source)
    return _finish(cls, values)


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: cabc.Sequence[str] = (), *,
                defaults: cabc.Mapping | None = None) -> T:
    """Dataclass defaults, then ``defaults``, then the YAML file, then the overrides."""
    _check_cls(cls)
    values = _default_values(cls)
    if defaults:
        _merge_mapping(cls, values, defaults, "", "defaults")
    if path is not None:
        data, source = _read_yaml(path)
        _merge_mapping(cls, values, data, "", source)
    _apply_override_list(cls, values, overrides)
    return _finish(cls, values)


def apply_overrides(cfg: T, overrides: cabc.Sequence[str]) -> T:
    """A new config: ``cfg`` with dotted ``key=value`` overrides applied and validated."""
    if not _is_dataclass_instance(cfg):
        raise TypeError(f"expected a dataclass instance, got {cfg!r}")
    cls = type(cfg)
    values = _instance_values(cfg)
    _apply_override_list(cls, values, overrides)
    return _finish(cls, values)


def config_to_dict(cfg: Any) -> dict:
    """Plain, YAML-serialisable nested dict in field order (tuples become lists)."""
    if not _is_dataclass_instance(cfg):
        raise TypeError(f"expected a dataclass instance, got {cfg!r}")
    return _plain(cfg)


def _plain(v: Any) -> Any:
    if _is_dataclass_instance(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
    if isinstance(v, enum.Enum):
        return _plain(v.value)
    if v is None or type(v) in (bool, int, float, str):
        return v
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return str(v)
    if isinstance(v, PurePath):
        return str(v)
    if isinstance(v, cabc.Mapping):
        return {_plain(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_plain(x) for x in v]
    return v


def config_to_yaml(cfg: Any) -> str:
    """The YAML text of ``config_to_dict(cfg)``, keys in dataclass field order."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False,
                     default_flow_style=False, allow_unicode=True)


def shipped_file(kind: str, name: str) -> Path:
    """A config shipped with llave-ds, by name: ``kind`` "train" (``configs/NAME.yaml``) or
    "deepspeed" (``ds_configs/NAME.json``). Read through the installed package (importlib
    resources), so it works from a wheel as from a checkout. A ConfigError lists the names."""
    from importlib import resources

    package, suffix = {"train": ("llave_ds.configs", ".yaml"), "deepspeed": ("llave_ds.ds_configs", ".json")}[kind]
    root = resources.files(package)
    path = Path(str(root.joinpath(name + suffix)))
    if not path.is_file():
        shipped = sorted(p.name[:-len(suffix)] for p in root.iterdir() if p.name.endswith(suffix))
        raise ConfigError(f"{name!r} is neither a {suffix} file nor one of the shipped {kind} configs {shipped}")
    return path


def dump_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (creating parent folders); ``load_config`` reads it back equal."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(config_to_yaml(cfg), encoding="utf-8")
    return p


def parse_cli(argv: cabc.Sequence[str] | None, cls: type[T], *,
              defaults: cabc.Mapping | None = None) -> T:
    """``[--config FILE] key.sub=value ...`` (in any order) into a validated ``cls``.

    ``argv`` excludes the program name; None means ``sys.argv[1:]``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    config_path: str | None = None
    overrides: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--config" or tok.startswith("--config="):
            if tok == "--config":
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ConfigError("--config needs a file path: --config FILE.yaml")
                path, i = args[i + 1], i + 2
            else:
                path, i = tok.split("=", 1)[1], i + 1
            if not path:
                raise ConfigError("--config needs a file path: --config FILE.yaml")
            if config_path is not None:
                raise ConfigError(f"--config given twice ({config_path!r} and {path!r})")
            config_path = path
            continue
        if tok.startswith("-"):
            raise ConfigError(
                f"Unknown option {tok!r}: only --config FILE is understood; settings are "
                f"given as key.sub=value without leading dashes")
        overrides.append(tok)
        i += 1
    return load_config(cls, config_path, overrides, defaults=defaults)


def _walk_keys(cls: type, prefix: str, values: dict | None = None,
               _stack: tuple = ()) -> list[tuple[str, Any, Any]]:
    """(dotted key, annotation, default or _MISSING) for every settable key, in order.

    An Optional section is listed itself (it can be set to null) and then its keys.
    """
    if values is None:
        values = _default_values(cls)
    rows: list[tuple[str, Any, Any]] = []
    for name, (_, tp) in _fields(cls).items():
        key = _join(prefix, name)
        v = values.get(name, _MISSING)
        sec = _section_type(tp)
        if sec is None:
            rows.append((key, tp, v))
            continue
        if sec in _stack:
            continue  # recursive config type: do not expand forever
        if sec is not tp:
            rows.append((key, tp, None if v is None else _MISSING if v is _MISSING else ...))
        sub = v if isinstance(v, dict) else _default_values(sec)
        rows.extend(_walk_keys(sec, key, sub, _stack + (cls,)))
    return rows


def config_keys(cls: type) -> list[str]:
    """Every settable dotted key of ``cls``, in field order."""
    _check_cls(cls)
    return [k for k, _, _ in _walk_keys(cls, "")]


def _format_default(v: Any) -> str:
    if v is _MISSING:
        return "<required>"
    if v is ...:
        return "{...}"
    text = yaml.dump(_plain(v), Dumper=_Dumper, default_flow_style=True,
                     width=float("inf"), allow_unicode=True)
    if text.endswith("\n...\n"):
        text = text[: -len("\n...\n")]
    return text.strip()


def describe_config(cls: type) -> str:
    """One line per dotted key: ``key: type = default`` (defaults in YAML syntax)."""
    _check_cls(cls)
    rows = _walk_keys(cls, "")
    if not rows:
        return ""
    width = max(len(k) for k, _, _ in rows) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {_type_name(tp)} = {_format_default(d)}"
                     for k, tp, d in rows)
