"""Configuration: nested dataclasses + YAML files + dotted command-line overrides, read
with OmegaConf structured configs (docs/DECISIONS.md says why).

A run's configuration is a tree of dataclasses. Values come in layers, later layers
winning key by key:

1. the dataclass defaults;
2. an optional ``defaults`` mapping given by the program;
3. a YAML file (a nested mapping);
4. dotted overrides ``key.sub=value`` (from the command line).

OmegaConf checks every value against the field's annotation (``int``, ``float``, ``bool``,
``str``, ``Optional[...]``, ``list[...]``, nested dataclass sections and ``Literal`` choices)
and refuses unknown keys. ``1e-4`` is a float in files and overrides alike. What this
module adds to the library:

* override values for a ``str`` or ``Literal`` field are taken literally
  (``name=yes`` gives ``"yes"``, ``revision=1234`` gives ``"1234"``, ``path=`` gives ``""``;
  ``null`` or ``~`` gives None where the field is Optional); a list field also takes a
  comma list without brackets (``data.subsets=A,B``, ``data.subsets=`` is ``[]``);
* an empty ``section:`` block in a file changes nothing;
* the layers are merged one at a time and every library error becomes a
  :class:`ConfigError` (a ``ValueError``) on one line naming the full dotted key, the value
  and the expected type or choices, where it came from (the YAML file, or
  ``override 'a.b=c'``), and for an unknown key the valid keys at its level with a "did
  you mean";
* after ``OmegaConf.to_object`` has built the plain dataclasses, ``validate()`` is called on
  every section that defines one, children before parents; a ``ValueError`` it raises comes
  back as a ``ConfigError`` prefixed with that section's dotted path
  (``objective: temperature must be > 0``). :func:`check_choices` lets a ``validate()``
  check the ``Literal`` fields of a config built in Python, from the same annotations.

``${a.b}`` in a value is an OmegaConf interpolation.

Typical use::

    cfg = load_config(TrainConfig, "configs/llave_2b.yaml", ["optim.lr=1e-4"])
    dump_config(cfg, out_dir / "config.yaml")    # load_config(TrainConfig, that) == cfg
"""
from __future__ import annotations

import collections.abc as cabc
import dataclasses
import difflib
import enum
import functools
import re
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

__all__ = ["ConfigError", "load_config", "config_from_dict", "config_to_dict", "config_to_yaml", "dump_config",
           "shipped_file", "check_choices"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration mistake. ``key`` (dotted) and ``source`` are set when known."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        super().__init__(message)
        self.key = key
        self.source = source


# --------------------------------------------------------------------------- types

def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """The init fields of dataclass ``cls`` with their resolved annotations."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``Optional[X]`` / ``X | None``, else ``(tp, False)``."""
    if get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp):
        members = [a for a in get_args(tp) if a is not type(None)]
        return (members[0] if len(members) == 1 else tp), True
    return tp, tp is Any


def _section(tp: Any) -> type | None:
    base = _unwrap(tp)[0]
    return base if isinstance(base, type) and dataclasses.is_dataclass(base) else None


def _walk(cls: type, parts: list[str], source: str | None) -> tuple[type | None, Any]:
    """(section class, field annotation) of the dotted key ``parts``; (section, None) when the
    last name is not a field of its section (OmegaConf then names the unknown key)."""
    for i, name in enumerate(parts):
        tp = _hints(cls).get(name)
        if tp is None or i == len(parts) - 1:
            return cls, tp
        sub = _section(tp)
        if sub is None:
            key = ".".join(parts[: i + 1])
            raise ConfigError(f"Cannot set '{'.'.join(parts)}'{_from(source)}: '{key}' is a value, "
                              f"not a section", key=key, source=source)
        cls = sub
    return cls, None


def check_choices(cfg: Any, prefix: str = "") -> None:
    """Raise ValueError if a ``Literal`` field of dataclass ``cfg`` holds another value (for
    configs built in Python; the loader already refuses them)."""
    for name, tp in _hints(type(cfg)).items():
        base, optional = _unwrap(tp)
        value = getattr(cfg, name)
        if get_origin(base) is Literal and not (optional and value is None) and value not in get_args(base):
            raise ValueError(f"{prefix}{name} must be one of {', '.join(map(str, get_args(base)))}, "
                             f"got {value!r}")


# --------------------------------------------------------------------------- errors

def _from(source: str | None) -> str:
    return f" (from {source})" if source else ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _hints(cls).items():
        out.append(_join(prefix, name))
        if _section(tp) is not None:
            out += _keys(_section(tp), _join(prefix, name))
    return out


def _unknown_key(cls: type, key: str, source: str | None) -> ConfigError:
    prefix, _, name = key.rpartition(".")
    section: type | None = cls
    for part in prefix.split(".") if prefix else ():
        section = _section(_hints(section).get(part)) if section else None
    valid = list(_hints(section)) if section else []
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    deeper = [k for k in _keys(section) if k.rsplit(".", 1)[-1] == name] if section else []
    msg = f"Unknown key '{key}'{_from(source)}."
    if close or deeper:
        msg += f" Did you mean '{_join(prefix, close[0] if close else deeper[0])}'?"
    where = f"under '{prefix}'" if prefix else "at the top level"
    return ConfigError(f"{msg} Valid keys {where}: {', '.join(valid)}.", key=key, source=source)


def _lookup(mapping: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(mapping, cabc.Mapping) or part not in mapping:
            return None
        mapping = mapping[part]
    return mapping


def _library_error(cls: type, exc: Exception, source: str | None, layer: Any = None,
                   key: str | None = None) -> ConfigError:
    """One line from an OmegaConf error: the key, what it says (value, type or choices), the source."""
    key = str(getattr(exc, "full_key", "") or "") or key
    said = " ".join(str(exc).split("full_key:")[0].split()) or type(exc).__name__
    if isinstance(exc, ConfigKeyError) and key:
        return _unknown_key(cls, key, source)
    if isinstance(exc, MissingMandatoryValue) and key:
        return ConfigError(f"Missing required key '{key}'", key=key, source=source)
    if key is None:
        return ConfigError(f"Invalid config{_from(source)}: {said}", source=source)
    base = _unwrap(_walk(cls, key.split("."), source)[1])[0]
    value = _lookup(layer, key)
    if get_origin(base) is Literal and value is not None:  # OmegaConf's text lacks a suggestion
        said = f"expected one of {', '.join(map(repr, get_args(base)))}, got {value!r}"
        close = difflib.get_close_matches(str(value), [str(c) for c in get_args(base)], n=1, cutoff=0.6)
        said += f". Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"Invalid value for '{key}'{_from(source)}: {said}", key=key, source=source)


# --------------------------------------------------------------------------- layers

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (YAML 1.2; PyYAML insists on a dot), as OmegaConf does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _read_yaml(path: str | Path) -> tuple[dict, str]:
    p, source = Path(path), str(path)
    if not p.is_file():
        raise ConfigError(f"Config file {'is not a regular file' if p.exists() else 'not found'}: {source}",
                          source=source)
    try:
        loaded = OmegaConf.load(p)  # refuses duplicate keys
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"Invalid config file {source}: {' '.join(str(e).split())}", source=source) from e
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"Config file {source} must hold a mapping of keys at the top level", source=source)
    return OmegaConf.to_container(loaded), source


def _drop_empty_sections(cls: type, mapping: dict) -> dict:
    """An empty ``section:`` block (None) for a section that cannot be None changes nothing."""
    out = {}
    for k, v in mapping.items():
        tp = _hints(cls).get(k) if isinstance(k, str) else None
        if _section(tp) is not None and v is None and not _unwrap(tp)[1]:
            continue
        out[k] = _drop_empty_sections(_section(tp), v) if _section(tp) and isinstance(v, dict) else v
    return out


def _override(cls: type, text: Any) -> tuple[dict, str, str]:
    """``key.sub=value`` as a nested one-key mapping, the value read for the field's type."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"Invalid override {text!r}: expected 'key.sub=value' (missing '=')",
                          source=f"override {text!r}")
    source = f"override '{text}'"
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"Invalid override '{text}': the key {key.strip()!r} must be dotted names like "
                          f"'section.field'", source=source)
    base, optional = _unwrap(_walk(cls, parts, source)[1])
    if optional and value.strip() in ("null", "~"):
        parsed: Any = None
    elif base is str or get_origin(base) is Literal or base is None:
        parsed = value  # taken literally (an unknown key is reported before its value matters)
    elif get_origin(base) in (list, cabc.Sequence) and not value.lstrip().startswith("["):
        parsed = [v.strip() for v in value.split(",")] if value.strip() else []
    else:
        try:
            parsed = yaml.load(value, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"Invalid value for '{key.strip()}' (from {source}): cannot read {value!r} as "
                              f"YAML ({' '.join(str(e).split())})", key=key.strip(), source=source) from e
    nested: Any = parsed
    for part in reversed(parts):
        nested = {part: nested}
    return nested, source, ".".join(parts)


def _merge(cls: type, cfg: DictConfig, layer: Any, source: str | None, key: str | None) -> DictConfig:
    if not isinstance(layer, cabc.Mapping):
        raise ConfigError(f"Config{_from(source)} must be a mapping, got {type(layer).__name__}", source=source)
    try:
        return OmegaConf.merge(cfg, _drop_empty_sections(cls, dict(layer)))
    except OmegaConfBaseException as e:
        raise _library_error(cls, e, source, layer, key) from e


def _validate(obj: Any, path: str) -> None:
    """``validate()`` on every dataclass in ``obj``, children first, errors prefixed with the path."""
    if not _is_dataclass_instance(obj):
        return
    for f in dataclasses.fields(obj):
        _validate(getattr(obj, f.name), _join(path, f.name))
    if callable(getattr(obj, "validate", None)):
        try:
            obj.validate()
        except ValueError as e:
            raise ConfigError(f"{path}: {e}" if path else str(e), key=path or None) from e


def _build(cls: type[T], layers: list[tuple[Any, str | None, str | None]]) -> T:
    """Merge the layers (mapping, source, the dotted key an override sets) one at a time."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    cfg = OmegaConf.structured(cls)
    for layer, source, key in layers:
        cfg = _merge(cls, cfg, layer, source, key)
    try:
        obj = OmegaConf.to_object(cfg)  # resolves ${...} interpolations; runs __post_init__
    except OmegaConfBaseException as e:
        raise _library_error(cls, e, None) from e
    except (TypeError, ValueError) as e:  # a check in a __post_init__
        raise ConfigError(str(e)) from e
    _validate(obj, "")
    return obj


# --------------------------------------------------------------------------- public API

def load_config(cls: type[T], path: str | Path | None = None, overrides: cabc.Sequence[str] = (), *,
                defaults: cabc.Mapping | None = None) -> T:
    """Dataclass defaults, then ``defaults``, then the YAML file, then the overrides; validated."""
    layers: list[tuple[Any, str | None, str | None]] = [(defaults, "defaults", None)] if defaults else []
    if path is not None:
        layers.append((*_read_yaml(path), None))
    layers += [_override(cls, text) for text in ([overrides] if isinstance(overrides, str) else overrides)]
    return _build(cls, layers)


def config_from_dict(cls: type[T], mapping: cabc.Mapping | None, source: str = "<dict>") -> T:
    """Build ``cls`` from its defaults updated by a nested mapping; validated."""
    return _build(cls, [(mapping if mapping is not None else {}, source, None)])


def config_to_dict(cfg: Any) -> dict:
    """Plain, YAML-serialisable nested dict in field order (enum members become their values)."""
    if not _is_dataclass_instance(cfg):
        raise TypeError(f"expected a dataclass instance, got {cfg!r}")
    return _plain(dataclasses.asdict(cfg))


def _plain(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return _plain(v.value)
    if isinstance(v, PurePath):
        return str(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def config_to_yaml(cfg: Any) -> str:
    """``cfg`` as YAML text that ``load_config`` reads back equal (``--print-config``)."""
    return OmegaConf.to_yaml(config_to_dict(cfg))


def dump_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (creating parent folders); ``load_config`` reads it back equal."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(config_to_yaml(cfg), encoding="utf-8")
    return p


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
