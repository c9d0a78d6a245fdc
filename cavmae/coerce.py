"""Typed values for config dataclasses read from YAML/JSON files.

YAML 1.1 reads ``lr: 1e-4`` as the *string* ``"1e-4"`` (a float needs a dot), JSON has no
tuples, and a hand-written file may hold ``epochs: "10"``. :func:`coerce_fields` converts every
value to its field's annotated type with pydantic's lax rules (numeric strings to numbers, lists
to tuples, ``"yes"``/``"no"`` to booleans) and names the key and the expected type when a value
does not fit, so a config mistake ends in one line instead of a ``TypeError`` deep in training.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

__all__ = ["FieldTypeError", "coerce_fields", "describe_type"]


class FieldTypeError(ValueError):
    """Values that do not fit their fields; ``problems`` holds one line per key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


_NAMES: dict[Any, str] = {
    int: "an integer", float: "a number", bool: "true or false", str: "a string",
    dict: "a mapping", type(None): "null",
}


def describe_type(annotation: Any) -> str:
    """What a value of ``annotation`` looks like in a config file, e.g. ``"an integer or null"``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(annotation))
    if origin is tuple:
        args = typing.get_args(annotation)
        inner = {describe_type(a) for a in args}
        what = inner.pop() if len(inner) == 1 else "values"
        return f"a list of {len(args)} {what.removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _adapter(annotation: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(annotation)


def _admits_bool(annotation: Any) -> bool:
    """Whether a field of this type may hold true/false (``bool``, a union with it, or ``Any``)."""
    return annotation is bool or annotation is Any or bool in typing.get_args(annotation)


def coerce_fields(cls: type, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``data`` with each value converted to the type of ``cls``'s dataclass field of that name.

    Keys that are not fields are passed through (the caller reports unknown keys). ``prefix``
    is put before key names in messages (e.g. ``"model_config."``).

    Raises:
        FieldTypeError: some values do not fit; one problem per key, such as
            ``lr: expected a number, got 'fast'``.
    """
    from pydantic import ValidationError

    hints = _hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in data.items():
        if key not in fields:
            out[key] = value
            continue
        if isinstance(value, bool) and not _admits_bool(hints[key]):  # pydantic would read true as 1
            problems.append(f"{prefix}{key}: expected {describe_type(hints[key])}, got {value!r}")
            continue
        try:
            out[key] = _adapter(hints[key]).validate_python(value)
        except ValidationError:
            problems.append(f"{prefix}{key}: expected {describe_type(hints[key])}, got {value!r}")
    if problems:
        raise FieldTypeError(problems)
    return out
