"""The recipe schema machinery: typed dataclass sections from YAML dicts, ``key.sub=value`` overrides, and
error messages that name the key and the fix. Which sections a recipe has is decided elsewhere
(``config.py`` assembles the generic sections and those of the recipe's method)."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import io
import keyword
import math
import re
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from unidad_dist.errors import UserError


# --------------------------------------------------------------------------------------------------
# YAML with floats as a person writes them (PyYAML reads "1e-4" as a string)
# --------------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    pass


# YAML 1.2 booleans: only true/false. (YAML 1.1 reads `mode: off` as False, and `off` is a valid mode.)
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise UserError(f"{where} is not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None


# --------------------------------------------------------------------------------------------------
# dict -> dataclass with type checks
# --------------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        name = " or ".join(_type_name(a) for a in args)
        return name + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str, pool: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, pool)
            except UserError:
                continue
        raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}; set a value of that type")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}; write a YAML list like [1, 2]")
        return [_coerce(v, inner, f"{key}[{i}]", pool) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping (section), got {value!r}")
        return from_dict(tp, value, prefix=key, pool=pool)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):  # 1e999 parses as inf; nan/inf are never a setting here
                raise UserError(f"{key}: expected a finite number, got {value!r}; set a finite value")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}; set a value of that type")


def key_of(name: str) -> str:
    """A field's recipe key: its name, less the trailing underscore of a name that would be a Python keyword
    (field ``async_`` is the key ``checkpoint.async``)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def as_dict(obj) -> Any:
    """A config dataclass as nested dicts keyed by recipe keys (``dataclasses.asdict`` with ``key_of``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {key_of(f.name): as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


def from_dict(cls, data: dict, prefix: str = "", pool: Optional[list[str]] = None):
    """Build dataclass ``cls`` from ``data``; ``pool``: every valid key of the whole recipe (for the
    closest-key hint of an unknown key)."""
    hints = typing.get_type_hints(cls)
    names = {key_of(f.name): f.name for f in dataclasses.fields(cls)}
    pool = all_keys(cls) if pool is None else pool
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise UserError(unknown_key_message(full, [f"{prefix}.{n}" if prefix else n for n in names] + pool))
        kwargs[names[k]] = _coerce(v, hints[names[k]], full, pool)
    return cls(**kwargs)


def leaf_fields(cls, prefix: str = ""):
    """(dotted key, owning dataclass, field, type) of every leaf key of ``cls``, nested sections flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        full = f"{prefix}.{key_of(f.name)}" if prefix else key_of(f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaf_fields(tp, full)
        else:
            yield full, cls, f, tp


def all_keys(cls, prefix: str = "") -> list[str]:
    return [key for key, *_ in leaf_fields(cls, prefix)]


# --------------------------------------------------------------------------------------------------
# Paths: relative paths inside a recipe file are relative to the recipe file
# --------------------------------------------------------------------------------------------------
def path_field(default=None):
    """A field holding a file or folder that is read (a model, data, a JSON file): a relative path written
    in a recipe file resolves against the recipe file's folder (``resolve_recipe_paths``)."""
    return dataclasses.field(default=default, metadata={"path": True})


def _is_relative_path(value) -> bool:
    return (isinstance(value, str) and value.strip() != "" and ":" not in value.split("/", 1)[0]
            and not value.startswith(("/", "~", "{")))  # builtin:x, pipe:cmd, s3://..., /abs, ~/x stay


def resolve_recipe_paths(cls, data: dict, base: Path) -> dict:
    """``data`` (a recipe's dict for dataclass ``cls``) with every relative path field made absolute
    against ``base``. Keys that are not fields are left for ``from_dict`` to report."""
    if not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    fields = {key_of(f.name): f for f in dataclasses.fields(cls)}
    out = dict(data)
    for k, v in data.items():
        f = fields.get(k)
        if f is None:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out[k] = resolve_recipe_paths(hints[f.name], v, base)
        elif f.metadata.get("path") and _is_relative_path(v):
            out[k] = str((base / v).resolve())
    return out


# --------------------------------------------------------------------------------------------------
# What each key means: a field's metadata "doc", else the comment on its line (or the lines above it)
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _source_comments(cls) -> dict:
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):  # a class made at run time (config_class) has no source
        return {}
    out, pending, line_field = {}, [], {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            row = tok.start[0]
            if row in line_field:
                out.setdefault(line_field[row], text)
            else:
                pending.append(text)
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_field:
            line_field[tok.start[0]] = tok.string
            if pending:
                out[tok.string] = " ".join(pending)
            pending = []
        elif tok.type == tokenize.NEWLINE:
            pass
        elif tok.type not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
            if tok.start[0] not in line_field:
                pending = []
    return out


def field_doc(cls, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name and f.metadata.get("doc"):
            return f.metadata["doc"]
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass):
            doc = _source_comments(klass).get(name)
            if doc:
                return doc
    return ""


def _default_of(f) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def describe_keys(cls, prefix: str = "") -> list[dict]:
    """Every key of ``cls``: {key, type, default, doc} (nested sections flattened to dotted keys)."""
    return [{"key": key, "type": _type_name(tp), "default": _default_of(f), "doc": field_doc(owner, f.name),
             "path": bool(f.metadata.get("path"))} for key, owner, f, tp in leaf_fields(cls, prefix)]


def unknown_key_message(key: str, pool: list[str]) -> str:
    close = difflib.get_close_matches(key, pool, n=1, cutoff=0.5)
    if not close:  # try matching only the last component, e.g. "studnet.steps" -> "student.steps"
        last = key.split(".")[-1]
        tails = {c.split(".")[-1]: c for c in pool}
        close = [tails[m] for m in difflib.get_close_matches(last, list(tails), n=1, cutoff=0.6)]
    hint = f"; did you mean '{close[0]}'?" if close else "; run `unidad-dist config --keys` to list valid keys"
    return f"unknown config key '{key}'{hint}"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.iterations=100", ...]`` (values read as YAML) -> a nested mapping."""
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key.sub=value (e.g. train.iterations=100)")
        key, raw = item.split("=", 1)
        pairs.append((key.strip(), parse_yaml(raw, f"override '{item}'") if raw.strip() != "" else "", item))
    return nest_dotted(pairs)


def nest_dotted(pairs, tree: dict | None = None) -> dict:
    """(dotted key, value[, how it was given]) pairs, or a mapping of dotted keys, set into a nested mapping
    (``tree`` when given), creating sections as needed."""
    tree = {} if tree is None else tree
    items = pairs.items() if isinstance(pairs, dict) else pairs
    for key, value, *given in items:
        item = given[0] if given else f"{key}={value}"
        key = str(key)
        if not key or any(not part for part in key.split(".")):
            raise UserError(f"override '{item}' has an empty key; write key.sub=value")
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise UserError(f"override '{item}' conflicts with an earlier override of '{p}'")
            node = nxt
        node[parts[-1]] = value
    return tree


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------
def choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}; pick one of them")


def positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{key} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")
