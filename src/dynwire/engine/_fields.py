"""Validated dataclass fields: the type coercion, range checks and error messages of run configs.

A field declared with :func:`opt` carries checks (``gt(0)``, ``choice(...)``) that return a
short reason (``"must be > 0"``) or None; :func:`build_section` coerces a raw mapping to the
field types and runs the checks, raising ``ValueError("section.key=value: reason")``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any, Literal, Optional, Union

__all__ = ["Check", "gt", "ge", "in_unit", "choice", "nonempty", "opt", "build_section", "unknown_key"]

# --------------------------------------------------------------------------- checks
# Each check returns None when the value is fine, else a short reason
# ("must be > 0"). They run after the type check, and are skipped for None.
Check = Callable[[Any], Optional[str]]


def gt(bound: float) -> Check:
    return lambda v: None if v > bound else f"must be > {bound:g}"


def ge(bound: float) -> Check:
    return lambda v: None if v >= bound else f"must be >= {bound:g}"


def in_unit(closed_low: bool = True) -> Check:
    def check(v: float) -> Optional[str]:
        ok = (0.0 <= v < 1.0) if closed_low else (0.0 < v < 1.0)
        return None if ok else ("must be in [0, 1)" if closed_low else "must be in (0, 1)")

    return check


def choice(options: tuple[str, ...]) -> Check:
    def check(v: str) -> Optional[str]:
        if v in options:
            return None
        hint = difflib.get_close_matches(str(v), options, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"must be one of {', '.join(options)}{extra}"

    return check


def nonempty(v: str) -> Optional[str]:
    return None if v.strip() else "must be a non-empty string"


def opt(default: Any, *checks: Check, doc: str = "", convert: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field with validation checks (and a normalising ``convert``) in its metadata."""
    meta = {"checks": checks, "doc": doc, "convert": convert}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- typing
def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in args) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return {int: "an int", float: "a number", bool: "a bool (true/false)", str: "a string", dict: "a mapping"}.get(
        tp, str(tp)
    )


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Type-check (and lightly coerce) ``value`` for a field annotated ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            try:
                return _coerce(key, value, inner[0])
            except ValueError:
                raise ValueError(f"{key}={value!r}: expected {_describe(tp)}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{key}={value!r}: must be a finite number")
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "4e-5" (no dot) as a string: accept numeric strings.
            try:
                parsed = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(parsed):
                    return parsed
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise ValueError(f"{key}={value!r}: keys must be strings, got {bad[0]!r}")
            return copy.deepcopy(value)
    else:  # pragma: no cover - schema only uses the types above
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise ValueError(f"{key}={value!r}: expected {_describe(tp)}")


def unknown_key(key: str, allowed: list[str]) -> ValueError:
    leaf = key.rsplit(".", 1)[-1]
    hint = difflib.get_close_matches(leaf, allowed, n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ValueError(f"{key}: unknown key{extra}; allowed: {', '.join(allowed)}")


def build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{name}={raw!r}: expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{name}.{k}"
        if k not in fields:
            raise unknown_key(key, list(fields))
        value = _coerce(key, v, hints[k])
        if value is not None:
            for check in fields[k].metadata["checks"]:
                reason = check(value)
                if reason:
                    raise ValueError(f"{key}={v!r}: {reason}")
            if fields[k].metadata["convert"] is not None:
                value = fields[k].metadata["convert"](value)
        kwargs[k] = value
    return cls(**kwargs)
