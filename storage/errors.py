"""Typed errors of the event store, mapped to HTTP codes at the edge (serve/app.py)."""

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
    """An event's data and meta together, as JSON, are over the log's ``max_event_bytes``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"event is {size} bytes (data and meta), over the {limit}-byte limit")
        self.size, self.limit = size, limit


class InvalidEvent(StoreError, ValueError):
    """The event cannot be stored as given (a NUL character, an integer beyond 64 bits, an expected version out of
    range, an invalid stream name ...): the caller's fault, nothing was written. A ``ValueError`` too, as invalid
    stream names were before it existed."""


class StreamsNotLocked(StoreError):
    """An append inside a caller's transaction that had already written something, without holding the stream
    (``EventLog.lock_streams``): its transaction id could be older than another writer's of that stream, and
    subscribers would get the stream out of order. A programming error; the transaction is left as it was."""


class StoreUnavailable(StoreError):
    """Postgres cannot be reached, the connection broke during the call, or the server cannot do it now (read
    only after a failover, a deadlock, a full disk: ``UNAVAILABLE_ERRORS``). The outcome of a write is unknown: a
    connection lost during its COMMIT may have committed it. Retry a write with the same idempotency key, which
    returns the original positions if it did commit.

    ``public`` is what a client may be told: the cause's kind without the server's address, which ``str`` (for
    logs) carries."""

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public or message

    def __reduce__(self) -> tuple[type[StoreUnavailable], tuple[str, str]]:  # Ray pickles it across actors
        return StoreUnavailable, (str(self), self.public)


# Errors after which the same request may well go through later: the server unreachable or the connection lost,
# or the server unable to do it now. Without the second kind a failover's read-only server, a deadlock or a full
# disk was an internal error (HTTP 500), and a message being answered then was answered as failed instead of
# delivered again.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby, or a primary demoted by a failover
    asyncpg.exceptions.TransactionRollbackError,  # deadlock, serialization failure
    asyncpg.exceptions.InsufficientResourcesError,  # disk full, out of memory, too many connections
    asyncpg.exceptions.OperatorInterventionError,  # query cancelled; server shutting down, crashed or starting up
    # A pooled connection the server ended while it sat idle (a restart, pg_terminate_backend): its farewell error
    # puts asyncpg's protocol in the middle of an operation before the socket's close is seen, and a query sent in
    # that moment fails here, before anything is sent ("cannot switch to state ..."). Once taken for a bug, it
    # answered a message being handled as failed, or, when that answer failed the same way, left it unanswered.
    asyncpg.exceptions.InternalClientError,
)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    try:
        yield
    except StoreError:
        raise
    except UNAVAILABLE_ERRORS as e:
        kind = type(e).__name__
        raise StoreUnavailable(f"event store unavailable: {kind}: {e}", f"event store unavailable ({kind})") from e
