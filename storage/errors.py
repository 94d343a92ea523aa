"""Typed errors of the event store, mapped to HTTP codes at the edge (serve/errors.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import asyncpg


class StoreError(Exception):
    """Base of event-store errors."""


class WrongExpectedVersion(StoreError):
    def __init__(self, stream: str, expected: object, actual: int) -> None:
        super().__init__(f"wrong expected version for {stream}: expected {expected}, actual {actual}")
        self.stream, self.expected, self.actual = stream, expected, actual


class EventTooLarge(StoreError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"event payload is {size} bytes, over the {limit}-byte limit")
        self.size, self.limit = size, limit


class StoreUnavailable(StoreError):
    """Postgres cannot be reached; nothing was acknowledged."""


CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.TooManyConnectionsError,
)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    try:
        yield
    except StoreError:
        raise
    except CONNECTION_ERRORS as e:
        raise StoreUnavailable(f"event store unavailable: {type(e).__name__}: {e}") from e
