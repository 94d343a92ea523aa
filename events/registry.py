"""Registry of payload models by type name, with upcasters for old schema versions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
M = TypeVar("M", bound=type[BaseModel])


class EventData(BaseModel):
    """Base of all payloads: strict about unknown fields so typos fail at the edge. JSON holds no NaN or
    infinity: a float field refuses them, and one inside an untyped value is kept (not turned into ``null``, the
    default) so that the log refuses it too (storage/eventlog.py ``_encoded``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, ser_json_inf_nan="constants")


class UnknownEventType(KeyError):
    def __str__(self) -> str:
        return f"unknown event type {self.args[0]!r}"


@dataclass
class EventSpec:
    name: str
    model: type[BaseModel]
    schema_version: int
    upcasters: dict[int, Upcaster] = field(default_factory=dict)


class Registry:
    """Maps type names to payload models; upcasts stored payloads to the current version."""

    def __init__(self) -> None:
        self._by_name: dict[str, EventSpec] = {}
        self._by_model: dict[type[BaseModel], EventSpec] = {}

    def register(self, name: str, model: type[BaseModel], schema_version: int = 1) -> None:
        if name in self._by_name and self._by_name[name].model is not model:
            raise ValueError(f"event type {name!r} registered twice")
        spec = EventSpec(name, model, schema_version)
        self._by_name[name] = spec
        self._by_model[model] = spec

    def upcaster(self, name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register ``fn(data) -> data`` lifting ``name`` from ``from_version`` to ``from_version + 1``."""

        def deco(fn: Upcaster) -> Upcaster:
            self.spec(name).upcasters[from_version] = fn
            return fn

        return deco

    def spec(self, name: str) -> EventSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownEventType(name) from None

    def spec_for_model(self, model: type[BaseModel]) -> EventSpec:
        try:
            return self._by_model[model]
        except KeyError:
            raise UnknownEventType(model.__name__) from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def upcast(self, name: str, data: dict[str, Any], version: int) -> dict[str, Any]:
        spec = self.spec(name)
        while version < spec.schema_version:
            fn = spec.upcasters.get(version)
            if fn is None:
                raise ValueError(f"no upcaster for {name!r} v{version} -> v{version + 1}")
            data = fn(dict(data))
            version += 1
        return data

    def decode(self, name: str, data: dict[str, Any], version: int = 1) -> BaseModel:
        return self.spec(name).model.model_validate(self.upcast(name, data, version))

    def validate(self, name: str, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Check a payload against its model (after upcasting); returns the normalised JSON form."""
        return self.decode(name, data, version).model_dump(mode="json")


registry = Registry()


def event_type(name: str, schema_version: int = 1) -> Callable[[M], M]:
    """Class decorator: ``@event_type("chat.message_received")`` registers a payload model."""

    def deco(model: M) -> M:
        registry.register(name, model, schema_version)
        return model

    return deco
