"""Config values checked where they enter: every stage's config is a dataclass whose fields carry
their type; a value from the command line, a `--config` TOML file or a Python caller is checked
against it here. A wrong type or a value that does not parse is a UserError naming the option,
never a silent misreading (a TOML `include-bos = "no"` is not true, `k = 8.5` is not 8).

Fields with a `parse` function in their metadata (counts such as "200k", lists such as "64,128")
accept text and are parsed; the others take their own type only (ints also where a float is
asked for, floats with a whole value where an int is).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from pipeline.util import UserError


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_type(hint: Any) -> tuple[Any, bool]:
    """The base type of a field's annotation and whether it may be None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def check_value(field: dataclasses.Field, hint: Any, value: Any, origin: str = "") -> Any:
    """`value` as the field's type (parsed where the field has a parser); UserError otherwise.
    `origin` (for example "config file run.toml: ") starts the message."""
    base, nullable = field_type(hint)
    name = option_name(field.name)
    if value is None:
        if nullable or field.default is None:
            return None
        raise UserError(f"{origin}{name} needs a value")
    parse = field.metadata.get("parse")
    if parse is not None and not isinstance(value, bool) and isinstance(value, (str, int, list)):
        try:
            return parse(value)
        except UserError as e:
            message = str(e) if str(e).startswith(name) else f"{name}: {e}"
            raise UserError(f"{origin}{message}") from None
    if base is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{origin}{name} takes true or false, got {value!r}")
    if base is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{origin}{name} takes a whole number, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{origin}{name} takes a number, got {value!r}")
    if base is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{origin}{name} takes text, got {value!r}")
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        if isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            return list(value)
        raise UserError(f"{origin}{name} takes a list of {item.__name__}s, got {value!r}")
    return value


def checked_values(cfg_cls: type, values: dict[str, Any], origin: str = "") -> dict[str, Any]:
    """Each of `values` (field name -> value) checked against the field of `cfg_cls`."""
    hints = typing.get_type_hints(cfg_cls)
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    return {name: check_value(fields[name], hints[name], value, origin) for name, value in values.items()}


def checked(cfg: Any) -> Any:
    """A copy of the config dataclass `cfg` with every field checked (and parsed) against its type."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **checked_values(type(cfg), values))
