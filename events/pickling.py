"""Models that cross Ray as their JSON.

Ray pickles every argument and result of every actor call. Pickling a pydantic model walks its fields and nested
models in Python (~26 µs per recorded event, ~300 µs for a request carrying a long chat history); its JSON is
written and parsed by pydantic-core in Rust, about four times cheaper, and the round trip is lossless for
models whose fields are JSON types, ids and timestamps, as everything in the log is."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def _from_json(cls: type[BaseModel], data: bytes) -> BaseModel:
    return cls.model_validate_json(data)


class PickledAsJson(BaseModel):
    def __reduce__(self) -> tuple[Any, ...]:
        return _from_json, (type(self), self.model_dump_json().encode())
