"""What every model family's config shares: presets by name and a JSON-safe round trip.

A family config is a ``@dataclass`` that inherits ``ConfigBase`` and sets ``presets`` (a
name -> keyword dict mapping) and ``family`` (used in messages). Lists read back from JSON
become tuples again, since configs hold per-layer/per-hierarchy values as tuples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="ConfigBase")


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
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} fields {unknown}; valid fields: {sorted(names)}"
            )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def from_name(cls: type[C], name: str, **overrides: Any) -> C:
        if name not in cls.presets:
            raise ValueError(
                f"unknown {cls.family} preset {name!r}; choose one of {sorted(cls.presets)}"
            )
        return cls.from_dict({**cls.presets[name], **overrides})
