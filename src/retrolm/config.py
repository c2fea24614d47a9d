"""What every model family's config shares: presets by name and a JSON-safe round trip.

``check_fields`` is the one place a dict from a user (a JSON config file, a checkpoint's
``config.json``) is checked against a config dataclass: unknown names and values of the
wrong type are refused as one ``ValueError`` naming the field, the type it needs and the
value given (a JSON ``"3e-4"`` would otherwise reach ``__post_init__`` as a string and fail
there as a ``TypeError`` traceback).

A family config is a ``@dataclass`` that inherits ``ConfigBase`` and sets ``presets`` (a
name -> keyword dict mapping) and ``family`` (used in messages). Lists read back from JSON
become tuples again, since configs hold per-layer/per-hierarchy values as tuples.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="ConfigBase")
T = TypeVar("T")


class ConfigBase:
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    family: ClassVar[str] = "model"
    #: fields left out of ``to_dict`` (in-memory only)
    transient_fields: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        for name in self.transient_fields:
            d.pop(name, None)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        return dataclass_from_dict(cls, d, lists_to_tuples=True)

    @classmethod
    def resolve(cls: type[C], config: C | None, overrides: dict[str, Any]) -> C:
        """What a model built as ``Model(config=None, **kwargs)`` runs with: ``cls(**kwargs)``
        without a config, else ``config`` with ``kwargs`` replaced (checked again)."""
        if config is None:
            return cls(**overrides)
        if not isinstance(config, cls):
            raise ValueError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        return dataclasses.replace(config, **overrides) if overrides else config

    @classmethod
    def from_name(cls: type[C], name: str, **overrides: Any) -> C:
        if name not in cls.presets:
            raise ValueError(
                f"unknown {cls.family} preset {name!r}; choose one of {sorted(cls.presets)}"
            )
        return cls.from_dict({**cls.presets[name], **overrides})


def require_positive_ints(obj: Any, names: typing.Iterable[str]) -> None:
    """Refuse, as one ``ValueError`` naming the field and its value, any of ``names`` on
    ``obj`` that is not an int >= 1 (the size checks every config repeats)."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")


def dataclass_from_dict(
    cls: type[T],
    d: dict[str, Any],
    where: str | None = None,
    unknown: str | None = None,
    lists_to_tuples: bool = False,
) -> T:
    """The one way a dict from a user (a JSON config file, a checkpoint's ``config.json``)
    becomes a config dataclass: checked by :func:`check_fields` (``where``, ``unknown``:
    its wording, by default the class's name), then ``cls(**d)``. ``lists_to_tuples``: JSON
    lists become tuples again (family configs hold per-layer values as tuples). Behind
    ``ConfigBase.from_dict``, ``TrainConfig.from_dict`` and the registry's configs."""
    where = where or cls.__name__
    check_fields(cls, d, where, unknown=unknown or f"unknown {cls.__name__} fields")
    if lists_to_tuples:
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d)


def check_fields(cls: type, values: Any, where: str, unknown: str | None = None) -> None:
    """Refuse ``values`` (a dict meant for the dataclass ``cls``) with a one-line
    ``ValueError`` when it is no dict, names a field ``cls`` lacks, or holds a value whose
    type does not fit the field's annotation. ``where`` prefixes field names in messages
    (``"TrainConfig"`` gives ``TrainConfig.lr``); ``unknown`` words the unknown-field error
    (default ``"{where}: unknown fields"``).

    JSON types map as follows: an int is a valid float, a list a valid tuple; a bool is
    neither an int nor a float. Annotations this check cannot judge (``Any``, classes of
    other kinds) accept everything: ``__post_init__`` still validates ranges.
    """
    if not isinstance(values, dict):
        raise ValueError(
            f"{where} must be a JSON object of field: value, got {type(values).__name__}"
        )
    names = [f.name for f in dataclasses.fields(cls)]
    bad = sorted(set(values) - set(names))
    if bad:
        raise ValueError(
            f"{unknown or where + ': unknown fields'} {bad}; valid fields: {sorted(names)}"
        )
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be evaluated here: leave types unchecked
        return
    for name, value in values.items():
        hint = hints.get(name, Any)
        if not _fits(value, hint):
            fix = " (write the number without quotes)" if _numeric_text(value) else ""
            raise ValueError(
                f"{where}.{name} must be {_describe(hint)}, got {value!r} "
                f"({type(value).__name__}){fix}"
            )


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON-like ``value`` fits the type annotation ``hint``."""
    if hint is Any or isinstance(hint, TypeVar):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_fits, value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    """An annotation in words: ``int | None`` -> "an integer or null"."""
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in words:
        return words[hint]
    if hint is type(None):
        return "null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
        if not args:
            return "a list"
        return f"a list of {plural.get(args[0], f'values ({_describe(args[0])})')}"
    if origin is dict:
        return "a JSON object"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def _numeric_text(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True
