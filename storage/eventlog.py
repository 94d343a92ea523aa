"""The event log on Postgres.

Trap 1 (skipped events) is solved with transaction-id visibility: every row records the id of the transaction
that wrote it (``tx_id``), and a subscriber reads only rows whose transaction is older than the oldest
transaction still running (``pg_snapshot_xmin``), in ``(tx_id, position)`` order. A row committed late by a
slow transaction is therefore never behind a subscriber's cursor. Within a stream, that order is version order:
every append locks its streams before its first write (migration 0008), so a transaction never gets its id before
another that writes an earlier version of one of its streams. Trap 2: one NOTIFY per append transaction, with
polling as a fallback. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg
import orjson
import structlog

from events import ANY, NO_STREAM, ExpectedVersion, NewEvent, RecordedEvent, Subscription, registry
from events.envelope import validate_stream
from storage import metrics
from storage.errors import (
    EventTooLarge,
    InvalidEvent,
    StoreUnavailable,
    StreamsNotLocked,
    WrongExpectedVersion,
    translate_errors,
)
from storage.group_commit import GroupCommit, PendingAppend
from storage.migrate import migrate

log = structlog.get_logger(__name__)

Cursor = tuple[int, int]
"""(tx_id, position): a subscriber's place in commit order."""

START: Cursor = (0, 0)
CHANNEL = "agenthub_events"
INT64_MAX = 2**63 - 1
_COLUMNS = "position, tx_id, id, stream, version, type, data, meta, recorded_at"


@dataclass(frozen=True)
class AppendResult:
    positions: list[int]
    versions: list[int]
    replayed: bool

    @property
    def last_position(self) -> int:
        return self.positions[-1]


@dataclass(frozen=True)
class Head:
    """The log's head as one snapshot saw it (``EventLog.head_cursor``): subscribe from ``cursor`` skipping the
    transactions in ``seen``, committed above it already, to get exactly the events committed after the snapshot."""

    cursor: Cursor
    seen: frozenset[int]


@dataclass(frozen=True)
class AfterPosition:
    """Subscribe to the events with a position above ``position``: a reader's "after what I listed". A position is
    not a place in commit order (a transaction older than the one at ``position`` may write above it later), so
    the subscription starts below every transaction that holds or may still write such an event, and drops what
    it reads again at or below ``position``."""

    position: int


class Committed(NamedTuple):
    events: list[RecordedEvent]
    cursor: Cursor
    held_by: int | None  # the oldest transaction still running, when committed events wait behind it

    @property
    def held_back(self) -> bool:
        """Committed events wait behind an older, still running transaction: look again soon."""
        return self.held_by is not None


HELD_BACK_RETRY_S = 0.005  # the first look again behind an open transaction, doubled while it stays open ...
HELD_BACK_MAX_S = 0.1  # ... up to this: a long transaction costs each follower 10 reads a second, not 200


def held_back_wait(tries: int, poll_interval: float) -> float:
    """How long to wait before reading again after ``tries`` reads in a row found commits held back (a commit
    that unblocks them sends no NOTIFY if it appended nothing, so this is how they are seen)."""
    return min(poll_interval, HELD_BACK_MAX_S, HELD_BACK_RETRY_S * 2 ** min(max(tries, 1) - 1, 16))


async def wait_at_most(wake: asyncio.Event, timeout: float) -> None:
    """Wait until ``wake`` is set, at most ``timeout`` seconds. Not ``asyncio.wait_for``: on Python 3.11 it
    swallows a cancellation that comes just as the event is set, so a loop that waits this way went on when
    cancelled, and whoever awaited its end waited for ever (a reply follower's restart hung a CI run)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await wake.wait()


@dataclass(frozen=True)
class Checkpoint:
    """Write ``subscriber``'s cursor in the same transaction as an append."""

    subscriber: str
    cursor: Cursor


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _any_leaf(value: Any, test: Callable[[Any], bool]) -> bool:
    """Whether ``test`` holds for any key or scalar inside ``value`` (dicts, lists and tuples walked)."""
    if isinstance(value, dict):
        return any(_any_leaf(k, test) or _any_leaf(v, test) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_any_leaf(v, test) for v in value)
    return test(value)


def _nul(v: Any) -> bool:
    return isinstance(v, str) and "\x00" in v


def _non_finite(v: Any) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def _encoded(value: dict[str, Any], what: str) -> bytes:
    """``value`` as the JSON text the log stores, or ``InvalidEvent`` if Postgres could not store it: found here,
    before the append joins a group commit, it fails only its own caller. The text goes to Postgres as it is
    (``text[]`` cast to ``jsonb[]`` there): asyncpg's ``jsonb[]`` encoding called the codec and three ABC
    ``isinstance`` checks per element, and encoded each value a second time (docs/architecture.md, "Speed").

    The searches of the text are cheap and the walks rare: jsonb rejects U+0000 (22P05), and orjson writes NaN
    and infinities as ``null``, which a float field of the event's model would refuse on every later read."""
    try:
        raw = orjson.dumps(value)
    except orjson.JSONEncodeError as e:  # an integer beyond 64 bits, say
        raise InvalidEvent(f"event {what} cannot be stored: {e}") from None
    if b"\\u0000" in raw and _any_leaf(value, _nul):
        raise InvalidEvent(f"event {what} contains a NUL character (U+0000), which the log cannot store")
    if b"null" in raw and _any_leaf(value, _non_finite):
        raise InvalidEvent(f"event {what} contains NaN or an infinity, which JSON cannot hold")
    return raw


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Pooled connections never LISTEN, lock or change settings (the listener and the migrator use their own),
    so the default reset query would only add a round trip to every append. asyncpg still rolls back a stray
    transaction on release."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")
    await conn.set_type_codec("xid8", encoder=str, decoder=int, schema="pg_catalog", format="text")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Fetching and decoding many rows builds many small objects, which otherwise triggers cyclic collections
    that rescan them all: half the cost of folding a long stream."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _rows_to_events(rows: list[asyncpg.Record]) -> list[RecordedEvent]:
    with gc_paused():
        return [_row_to_event(r) for r in rows]


def _row_to_event(r: asyncpg.Record) -> RecordedEvent:
    return RecordedEvent(
        position=r[0],
        tx_id=r[1],
        id=r[2],
        stream=r[3],
        version=r[4],
        type=r[5],
        data=r[6],
        meta=r[7],
        recorded_at=r[8],
    )


class EventLog:
    """Append, read and subscribe. One instance per process; safe for concurrent use."""

    def __init__(self, pool: asyncpg.Pool, url: str, max_event_bytes: int = 256 * 1024) -> None:
        self.pool = pool
        self.url = url
        self.max_event_bytes = max_event_bytes
        self.group = GroupCommit(self._append_batch)
        # One LISTEN connection for all of this process's subscriptions (SSE clients, the reply follower, the
        # CLI), not one each: a few hundred SSE clients would otherwise use up Postgres's max_connections.
        self._listener: Listener | None = None
        self._listening = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        max_event_bytes: int = 256 * 1024,
        run_migrations: bool = True,
    ) -> EventLog:
        with translate_errors():
            if run_migrations:
                conn = await asyncpg.connect(url, timeout=10)
                try:
                    await migrate(conn)
                finally:
                    await conn.close()
            pool = await asyncpg.create_pool(
                url,
                reset=_no_reset,
                min_size=min_size,
                max_size=max_size,
                init=_init_connection,
                timeout=5,
                command_timeout=60,
            )
        return cls(pool, url, max_event_bytes)

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        await self.pool.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; connection failures surface as ``StoreUnavailable`` and reset the pool."""
        try:
            with translate_errors():
                async with self.pool.acquire() as conn:
                    yield conn
        except StoreUnavailable:
            await self.pool.expire_connections()  # a coroutine in asyncpg 0.32: without the await nothing expired
            raise

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run a query on a pooled connection (read models, telemetry): errors as in ``connection``."""
        async with self.connection() as c:
            return await c.fetch(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.connection() as c:
            return await c.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> str:
        async with self.connection() as c:
            return await c.execute(sql, *args)

    # ---- writing -------------------------------------------------------------------------------------

    def _prepare(self, events: Sequence[NewEvent]) -> tuple[list[Any], list[str], list[str], list[str]]:
        """Validate, upcast, encode and size the events; everything the database would reject for their content is
        raised here as ``InvalidEvent`` or ``EventTooLarge``."""
        ids, types, datas, metas = [], [], [], []
        for e in events:
            data = registry.validate(e.type, e.data, e.meta.schema_version)
            meta = e.meta.model_dump(mode="json", exclude_none=True)
            meta["schema_version"] = registry.spec(e.type).schema_version  # ``data`` is upcast to it: read as such
            data_json, meta_json = _encoded(data, "data"), _encoded(meta, "meta")
            size = len(data_json) + len(meta_json)  # bytes, as stored
            if size > self.max_event_bytes:
                raise EventTooLarge(size, self.max_event_bytes)
            ids.append(e.id)
            types.append(e.type)
            datas.append(data_json.decode())
            metas.append(meta_json.decode())
        return ids, types, datas, metas

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        expected: ExpectedVersion = ANY,
        *,
        idempotency_key: str | None = None,
        checkpoint: Checkpoint | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> AppendResult:
        """Append atomically. Raises ``WrongExpectedVersion``, ``EventTooLarge``, ``InvalidEvent`` (a bad stream
        name, idempotency key, expected version or payload: nothing the caller can retry), ``UnknownEventType``,
        ``StoreUnavailable`` (outcome unknown: retry with an idempotency key). With ``idempotency_key``, a retry
        returns the original positions.

        With ``conn``, the append joins the caller's transaction. If that transaction has already written anything,
        call ``lock_streams(conn, ...)`` before its first write, with every stream it will append to: otherwise its
        transaction id, assigned at that first write, may be older than that of a transaction that appends an
        earlier version of one of these streams meanwhile, and subscribers would get the two out of order. Such an
        append without the lock raises ``StreamsNotLocked`` (one more query, on this path only)."""
        try:
            validate_stream(stream)
        except ValueError as e:
            raise InvalidEvent(str(e)) from None
        if not events:
            raise ValueError("append needs at least one event")
        if idempotency_key is not None and "\x00" in idempotency_key:
            raise InvalidEvent("idempotency key contains a NUL character")
        ids, types, datas, metas = self._prepare(events)
        if expected is ANY:
            mode, exp = "any", 0
        elif expected is NO_STREAM:
            mode, exp = "no_stream", 0
        else:
            mode, exp = "exact", int(expected)
            if not 0 <= exp <= INT64_MAX:
                raise InvalidEvent(f"expected version {exp} is out of range (0 to {INT64_MAX}, ANY or NO_STREAM)")
        if conn is None and checkpoint is None:  # on its own: share a transaction with concurrent appends
            pending = PendingAppend(stream, mode, exp, idempotency_key, ids, types, datas, metas)
            batched = await self.group.append(pending)
            if batched is not None:
                if batched[0][4] is not None:
                    return await self._conflict(stream, expected, mode, int(batched[0][4]), idempotency_key)
                return self._appended([(r[1], r[2]) for r in batched], bool(batched[0][3]))
        cp_sub, cp_tx, cp_pos = (checkpoint.subscriber, *checkpoint.cursor) if checkpoint else (None, None, None)
        args = (stream, mode, exp, ids, types, datas, metas, idempotency_key, cp_sub, cp_tx, cp_pos)
        try:
            if conn is not None:
                with translate_errors():
                    if not await conn.fetchval(LOCKED_OR_FIRST_WRITE_SQL, stream):
                        raise StreamsNotLocked(
                            f"this transaction wrote before appending to {stream!r} without holding it: call "
                            "EventLog.lock_streams(conn, [...every stream it appends to]) before its first write"
                        )
                    rows = await conn.fetch(APPEND_SQL, *args)
            else:
                async with self.connection() as c:
                    rows = await c.fetch(APPEND_SQL, *args)
        except asyncpg.PostgresError as e:
            # In the caller's transaction (``conn``) the error has aborted it: an append that another transaction
            # already made under the key is no success of this one, whose other writes will roll back.
            key = idempotency_key if conn is None else None
            if e.sqlstate == "AH409":
                return await self._conflict(stream, expected, mode, int(e.detail), key)
            if isinstance(e, asyncpg.DataError):  # class 22: what _prepare did not catch is still the input's fault
                raise InvalidEvent(f"the log cannot store this event: {e}") from e
            if isinstance(e, asyncpg.UniqueViolationError) and key is not None:
                original = await self._idempotent_lookup(key)
                if original is not None:
                    if checkpoint is not None:  # as the append function does for a replay: the work is recorded
                        await self.save_checkpoint(checkpoint.subscriber, checkpoint.cursor)
                    return original
            raise
        return self._appended([(r[0], r[1]) for r in rows], bool(rows and rows[0][2]))

    def _appended(self, rows: list[tuple[int, int]], replayed: bool) -> AppendResult:
        rows = sorted(rows, key=lambda r: r[1])
        result = AppendResult([r[0] for r in rows], [r[1] for r in rows], replayed)
        if not replayed:
            metrics.EVENTS_APPENDED.inc(len(rows))
        return result

    async def _conflict(
        self, stream: str, expected: ExpectedVersion, mode: str, actual: int, idempotency_key: str | None
    ) -> AppendResult:
        if idempotency_key is not None:
            # A concurrent retry of the same command won the race: return what it wrote.
            original = await self._idempotent_lookup(idempotency_key)
            if original is not None:
                return original
        raise WrongExpectedVersion(stream, expected if mode == "exact" else mode, actual)

    async def _append_batch(self, batch: list[PendingAppend]) -> list[Any]:
        if len(batch) == 1:  # alone: the plain function, which does not copy a slice of the arrays (big appends)
            p = batch[0]
            args = (p.stream, p.mode, p.expected, p.ids, p.types, p.datas, p.metas, p.idempotency_key)
            try:
                async with self.connection() as c:
                    rows = await c.fetch(APPEND_SQL, *args, None, None, None)
            except asyncpg.PostgresError as e:
                if e.sqlstate != "AH409":
                    raise
                return [(1, None, None, False, int(e.detail))]
            return [(1, r[0], r[1], r[2], None) for r in rows]
        offsets, counts, ids, types, datas, metas = [], [], [], [], [], []
        for p in batch:
            offsets.append(len(ids) + 1)
            counts.append(len(p.ids))
            ids += p.ids
            types += p.types
            datas += p.datas
            metas += p.metas
        async with self.connection() as c:
            return await c.fetch(
                "SELECT * FROM agenthub_append_batch_notify($1, $2, $3, $4, $5, $6, $7, $8, $9::text[]::jsonb[], "
                "$10::text[]::jsonb[])",
                [p.stream for p in batch],
                [p.mode for p in batch],
                [p.expected for p in batch],
                [p.idempotency_key for p in batch],
                offsets,
                counts,
                ids,
                types,
                datas,
                metas,
            )

    async def lock_streams(self, conn: asyncpg.Connection, streams: Sequence[str]) -> None:
        """Hold ``streams`` until the end of ``conn``'s transaction, as every append does before its first write:
        for a transaction that writes something else before it appends (see ``append``), or that appends to
        several streams and must take their locks in the one order every batch does. Taking a lock assigns no
        transaction id. Called after the transaction's first write, for a stream it does not hold yet, it raises
        ``StreamsNotLocked``."""
        with translate_errors():
            if not await conn.fetchval(LOCKS_IN_TIME_SQL, list(streams)):
                raise StreamsNotLocked(
                    "lock_streams came after this transaction's first write: call it before the transaction writes "
                    "anything, with every stream it will append to"
                )
            await conn.execute("SELECT agenthub_lock_streams($1::text[])", list(streams))

    async def _idempotent_lookup(self, key: str) -> AppendResult | None:
        async with self.connection() as c:
            rows = await c.fetch("SELECT position, version FROM events WHERE idem_key = $1 ORDER BY idem_seq", key)
        if not rows:
            return None
        return AppendResult([r[0] for r in rows], [r[1] for r in rows], True)

    # ---- reading -------------------------------------------------------------------------------------

    async def effect_of(self, cause: RecordedEvent, types: Collection[str] | None = None) -> RecordedEvent | None:
        """The first event after ``cause`` in its stream that it caused (of ``types``, if given): a message's reply."""
        for e in await self.read_stream(cause.stream, cause.version + 1):
            if e.meta.causation_id == cause.id and (types is None or e.type in types):
                return e
        return None

    async def read_stream(self, stream: str, from_version: int = 1, limit: int | None = None) -> list[RecordedEvent]:
        """A stream's events by version: the activation path of every entity, so it skips what it knows."""
        with gc_paused():
            rows = await self.fetch(
                "SELECT position, 0, id, $1, version, type, data, meta, recorded_at FROM events "
                "WHERE stream = $1 AND version >= $2 ORDER BY version LIMIT $3",
                stream,
                from_version,
                limit,
            )
            return [_row_to_event(r) for r in rows]

    async def stream_version(self, stream: str) -> int:
        async with self.connection() as c:
            v = await c.fetchval("SELECT version FROM streams WHERE stream = $1", stream)
        return int(v or 0)

    async def read_all(
        self,
        from_position: int = 0,
        *,
        types: Sequence[str] | None = None,
        stream: str | None = None,
        limit: int = 1000,
    ) -> list[RecordedEvent]:
        """Events after ``from_position`` in position order (for queries; subscriptions use commit order)."""
        where, args = ["position > $1"], [from_position]
        if types:
            args.append(list(types))
            where.append(f"type = ANY(${len(args)})")
        if stream:
            args.append(stream)
            where.append(f"stream = ${len(args)}")
        args.append(limit)
        sql = f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY position LIMIT ${len(args)}"
        async with self.connection() as c:
            rows = await c.fetch(sql, *args)
        return _rows_to_events(rows)

    async def read_where(self, condition: str, *args: Any) -> list[RecordedEvent]:
        """Events matching a trusted SQL ``condition`` (never built from user input), in position order."""
        rows = await self.fetch(f"SELECT {_COLUMNS} FROM events WHERE {condition} ORDER BY position", *args)
        return _rows_to_events(rows)

    async def read_committed(self, after: Cursor, limit: int = 500, types: Sequence[str] | None = None) -> Committed:
        """Events after ``after`` in commit order, only from transactions that can no longer be overtaken.

        Returns the events, the cursor after the rows read, and the id of the oldest transaction still running when
        committed events are held back behind it (its commit may send no NOTIFY: a projection's, say, so a
        subscriber that only waited for one would wait for its poll interval; and one that stays open holds every
        subscriber back, which the orchestrator reports). With ``types``, only events of those types are decoded
        and returned; the cursor still moves past the others."""
        rows = await self.fetch(
            READ_COMMITTED_SQL,
            after[0],
            after[1],
            limit,
            list(types) if types else None,
        )
        held = None if rows[0][10] is None else int(rows[0][10])
        if rows[0][0] is None:  # nothing visible: the one row only carries the flag
            return Committed([], after, held)
        cursor = (int(rows[-1][1]), int(rows[-1][0]))
        return Committed(_rows_to_events([r for r in rows if r[9]]), cursor, held)

    async def describe_transaction(self, tx: int) -> dict[str, Any] | None:
        """Who runs transaction ``tx`` (a ``held_by``): a backend's pid, database, user, application, state, age and
        query, or a prepared transaction's gid; None once it has ended. Another user's query reads
        ``<insufficient privilege>`` unless the log's role may read all statistics."""
        rows = await self.fetch(DESCRIBE_TRANSACTION_SQL, tx)
        return {k: v for k, v in dict(rows[0]).items() if v is not None} if rows else None

    async def committed_pages(
        self, after: Cursor, limit: int = 5000, types: Sequence[str] | None = None
    ) -> AsyncIterator[list[RecordedEvent]]:
        """``read_committed`` page by page from ``after`` up to what is visible now (what commits later, or is
        held back, is left for the caller's next read). A page may be empty: it had no events of ``types``."""
        while (got := await self.read_committed(after, limit, types)).cursor != after:
            yield got.events
            after = got.cursor

    async def cursor_at(self, position: int) -> Cursor:
        """Where to subscribe from for the events after ``position`` (exclusive, as ``read_all(position)``): the
        commit-order cursor of the last event at or before ``position``, ``START`` when there is none. For a position
        with an event that is the event's own cursor; a position without one (the gap an aborted append leaves,
        an append not committed yet, a position past the head) resumes after the event before it: past the head,
        after the event with the highest position (where transactions interleave at the top of the log, an event
        of an older one below it is delivered again; ``head_cursor`` is exact). Commit order is not position
        order across transactions, so this is a position's meaning only up to that: an event after ``position``
        written by a transaction older than the one at ``position`` comes before it in commit order and is not
        delivered from here (``subscribe(AfterPosition(position))`` delivers it). An event's ``cursor`` is the
        exact place to resume from."""
        if position <= 0:
            return START
        async with self.connection() as c:
            r = await c.fetchrow(
                "SELECT tx_id, position FROM events WHERE position <= $1 ORDER BY position DESC LIMIT 1",
                min(position, INT64_MAX),
            )
        return (int(r[0]), int(r[1])) if r else START

    async def last_cursor(self) -> Cursor:
        """The commit-order cursor of the last event committed so far (``START`` on an empty log). A subscriber
        whose cursor reached it has handled every event this call could see, whatever order the transactions
        committed in (read-your-writes for read models: ``?fresh=true`` at the API)."""
        async with self.connection() as c:
            r = await c.fetchrow("SELECT tx_id, position FROM events ORDER BY tx_id DESC, position DESC LIMIT 1")
        return (int(r[0]), int(r[1])) if r else START

    async def _after_position(self, position: int) -> tuple[int | None, Cursor | Head]:
        """Where ``AfterPosition(position)`` starts, and the position to drop events at or below (None: drop
        none). At or past the newest event: the head, as what comes next. Else a cursor below every transaction
        that wrote, or may yet write, an event above ``position``: the oldest of those that did and the oldest
        still running. One snapshot for both (repeatable read): the head taken in a second one would count as
        seen an event committed in between, which the first did not see above ``position``."""
        async with self.connection() as c, c.transaction(isolation="repeatable_read", readonly=True):
            newest, oldest = await c.fetchrow(
                "SELECT (SELECT max(position) FROM events), "
                f"least((SELECT min(tx_id) FROM events WHERE position > $1), {_HORIZON})::text::bigint",
                min(max(position, 0), INT64_MAX),
            )
            if newest is None or position >= newest:
                return None, await _head(c)
        return position, (int(oldest) - 1, INT64_MAX)

    async def head_cursor(self) -> Head:
        """Where "only what comes next" starts. One cursor cannot say it exactly: below the oldest transaction
        still open every event is committed, but above it some are (younger transactions that committed first)
        and some are not. So the head is the newest event below that horizon plus the transactions above it
        already committed, all in one statement (one snapshot); ``subscribe`` from it skips those, and delivers
        every event committed later exactly once. Used as a plain cursor (``.cursor``) it may deliver those again."""
        async with self.connection() as c:
            return await _head(c)

    async def subscribe(
        self,
        after: Cursor | Head | AfterPosition = START,
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        subscription: Subscription | None = None,
        types: Sequence[str] | None = None,
        active: Callable[[], bool] | None = None,
    ) -> AsyncIterator[tuple[list[RecordedEvent], Cursor]]:
        """Catch up from ``after``, then follow live. Yields ``(matching events, cursor after the batch)``;
        the cursor advances even when no event of a batch matches, so callers can checkpoint it. ``types`` filters
        in the database (only those events are decoded). While ``active()`` is false nothing is read and the
        cursor stays put; the first wake-up after it turns true catches up from there. From a ``Head``
        (``head_cursor``): exactly the events committed after it was taken. From an ``AfterPosition``: every event
        above that position, whenever its transaction commits."""
        above: int | None = None
        if isinstance(after, AfterPosition):
            above, after = await self._after_position(after.position)
        wake = asyncio.Event()
        await self._listen(wake)
        cursor, seen = (after.cursor, after.seen) if isinstance(after, Head) else (after, frozenset[int]())
        held = 0  # reads in a row that found commits held back
        try:
            while True:
                wake.clear()
                wait = poll_interval
                if active is None or active():
                    try:
                        got = await self.read_committed(cursor, batch_size, types)
                    except StoreUnavailable as e:
                        log.warning("subscription read failed, retrying", error=str(e))
                        await asyncio.sleep(min(poll_interval, 0.5))
                        continue
                    batch = got.events
                    if got.cursor != cursor:
                        cursor, held = got.cursor, 0
                        if seen:
                            batch = [e for e in batch if e.tx_id not in seen]
                            # kept until the cursor is past the last of them: a batch may end inside one
                            seen = seen if cursor[0] <= max(seen) else frozenset()
                        if above is not None:  # new events always land above it: a cheap test from then on
                            batch = [e for e in batch if e.position > above]
                        matching = batch if subscription is None else [e for e in batch if subscription.matches(e)]
                        yield matching, cursor
                        continue
                    if got.held_back:
                        held += 1
                        wait = held_back_wait(held, poll_interval)
                await wait_at_most(wake, wait)
        finally:
            await self._unlisten(wake)

    async def _listen(self, wake: asyncio.Event) -> None:
        """Have the shared listener set ``wake`` on every NOTIFY, starting it for the first subscription."""
        async with self._listening:
            if self._listener is None:
                self._listener = Listener(self.url)
                self._listener.wakes.add(wake)
                await self._listener.start()
            else:
                self._listener.wakes.add(wake)

    async def _unlisten(self, wake: asyncio.Event) -> None:
        """Stop waking ``wake``; the last subscription to leave closes the listener's connection."""
        async with self._listening:
            listener = self._listener
            if listener is None:
                return
            listener.wakes.discard(wake)
            if not listener.wakes:
                self._listener = None
                await listener.close()

    # ---- snapshots and checkpoints ------------------------------------------------------------------

    async def save_snapshot(self, stream: str, version: int, state: dict[str, Any]) -> None:
        async with self.connection() as c:
            await c.execute(
                "INSERT INTO snapshots (stream, version, state) VALUES ($1, $2, $3) ON CONFLICT (stream) DO "
                "UPDATE SET version = EXCLUDED.version, state = EXCLUDED.state, updated_at = now() "
                "WHERE snapshots.version < EXCLUDED.version",
                stream,
                version,
                state,
            )

    async def load_snapshot(self, stream: str) -> tuple[int, dict[str, Any]] | None:
        async with self.connection() as c:
            r = await c.fetchrow("SELECT version, state FROM snapshots WHERE stream = $1", stream)
        return (int(r[0]), r[1]) if r else None

    async def load_checkpoint(self, subscriber: str) -> Cursor:
        async with self.connection() as c:
            r = await c.fetchrow("SELECT tx_id, position FROM checkpoints WHERE subscriber = $1", subscriber)
        return (int(r[0]), int(r[1])) if r else START

    async def save_checkpoint(self, subscriber: str, cursor: Cursor, conn: asyncpg.Connection | None = None) -> None:
        """Move ``subscriber``'s checkpoint forward to ``cursor``; one already past it stays (a flush that captured
        an older cursor must not undo what the subscriber recorded in its own transaction)."""
        if conn is not None:
            with translate_errors():
                await conn.execute(CHECKPOINT_SQL, subscriber, cursor[0], cursor[1])
            return
        await self.save_checkpoints({subscriber: cursor})

    async def save_checkpoints(self, cursors: dict[str, Cursor]) -> None:
        """Several subscribers' checkpoints in one round trip (asyncpg pipelines ``executemany``); forward only, as
        ``save_checkpoint``."""
        async with self.connection() as c:
            await c.executemany(CHECKPOINT_SQL, [(name, tx, pos) for name, (tx, pos) in cursors.items()])


# Every append notifies inside its own transaction, so the NOTIFY arrives with the commit (migration 0007 says why
# the notify lock no longer costs what it did when 0004 took NOTIFY out of the append).
_WANTED = "($4::text[] IS NULL OR type = ANY($4::text[]))"
_HORIZON = "pg_snapshot_xmin(pg_current_snapshot())"  # the oldest transaction still running
# Events after the cursor ($1, $2) below the horizon, at most $3, decoded only when of the types $4; and the
# horizon when anything at or past it is visible (``held``, else null). ``held`` compares the newest transaction
# id, read from the end of the commit-order index. Asked as ``EXISTS (... WHERE tx_id >= horizon)``, the planner
# cannot estimate the horizon and scanned the whole log on every read (docs/architecture.md, "Speed").
READ_COMMITTED_SQL = (
    "SELECT b.*, f.held FROM (SELECT CASE WHEN (SELECT tx_id FROM events ORDER BY tx_id DESC LIMIT 1) >= h.x "
    f"THEN h.x END AS held FROM (SELECT {_HORIZON} AS x) h) f LEFT JOIN LATERAL (SELECT position, tx_id, id, "
    f"stream, version, type, CASE WHEN {_WANTED} THEN data END, CASE WHEN {_WANTED} THEN meta END, recorded_at, "
    f"{_WANTED} FROM events "
    f"WHERE (tx_id, position) > ($1::xid8, $2) AND tx_id < {_HORIZON} ORDER BY tx_id, position LIMIT $3) b ON true "
    "ORDER BY b.tx_id, b.position"
)
# A transaction (xid8) as pg_stat_activity and pg_prepared_xacts show it (both by its 32-bit xid).
DESCRIBE_TRANSACTION_SQL = (
    "SELECT pid, datname AS database, usename AS user, application_name AS application, state, "
    "round(extract(epoch FROM now() - xact_start)::numeric, 1)::float8 AS open_s, left(query, 200) AS query, "
    "NULL AS prepared_gid FROM pg_stat_activity WHERE backend_xid = xid($1::xid8) "
    "UNION ALL SELECT NULL, database, owner, NULL, 'prepared', round(extract(epoch FROM now() - prepared)::numeric, "
    "1)::float8, NULL, gid FROM pg_prepared_xacts WHERE transaction = xid($1::xid8) LIMIT 1"
)
APPEND_SQL = (
    "SELECT * FROM agenthub_append($1, $2, $3, $4, $5, $6::text[]::jsonb[], $7::text[]::jsonb[], $8, $9, $10, $11, "
    "true)"
)
# The head (``EventLog.head_cursor``) in one statement, so under one snapshot: the newest event below the oldest
# open transaction, and the transactions above it already committed, found by one index probe each (there are few,
# however long the log).
HEAD_SQL = (
    "WITH RECURSIVE h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS x), above(tx) AS ("
    "SELECT (SELECT tx_id FROM events WHERE tx_id >= (SELECT x FROM h) ORDER BY tx_id LIMIT 1) UNION ALL "
    "SELECT (SELECT tx_id FROM events WHERE tx_id > above.tx ORDER BY tx_id LIMIT 1) FROM above "
    "WHERE above.tx IS NOT NULL) "
    "SELECT b.tx_id, b.position, ARRAY(SELECT tx::text FROM above WHERE tx IS NOT NULL) FROM h LEFT JOIN LATERAL "
    "(SELECT tx_id, position FROM events WHERE tx_id < h.x ORDER BY tx_id DESC, position DESC LIMIT 1) b ON true"
)
CHECKPOINT_SQL = "SELECT agenthub_save_checkpoint($1, $2::xid8, $3)"  # forward only (migration 0008)
# In a caller's transaction: true when nothing was written yet (no transaction id) or the stream's lock (migration
# 0008: key pair 16712, hashtext(stream), shown in pg_locks as classid, objid as an unsigned oid, objsubid 2) is held.


def _held(stream: str) -> str:
    """SQL: this session holds the advisory lock ``agenthub_lock_streams`` takes for ``stream`` (an expression)."""
    return (
        "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted "
        f"AND classid = 16712 AND objsubid = 2 AND objid = (hashtext({stream})::bigint & 4294967295)::oid)"
    )


LOCKED_OR_FIRST_WRITE_SQL = f"SELECT pg_current_xact_id_if_assigned() IS NULL OR {_held('$1')}"
# Locks taken after the transaction's first write come too late (its id is older than a commit it waits for).
LOCKS_IN_TIME_SQL = (
    f"SELECT pg_current_xact_id_if_assigned() IS NULL OR coalesce(bool_and({_held('s')}), true) "
    "FROM unnest($1::text[]) AS s"
)


async def _head(c: asyncpg.Connection) -> Head:
    """``EventLog.head_cursor`` on ``c``: in a repeatable-read transaction, as of its snapshot."""
    r = await c.fetchrow(HEAD_SQL)
    cursor = (int(r[0]), int(r[1])) if r[0] is not None else START
    return Head(cursor, frozenset(int(tx) for tx in r[2]))


class Listener:
    """LISTEN on a dedicated connection and set every event in ``wakes`` on each NOTIFY; reconnects in the
    background when the connection drops."""

    def __init__(self, url: str, wake: asyncio.Event | None = None) -> None:
        self.url = url
        self.wakes: set[asyncio.Event] = {wake} if wake is not None else set()
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def _notified(self, *_: object) -> None:
        for wake in self.wakes:
            wake.set()

    def _lost(self, *_: object) -> None:
        if not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self.url, timeout=5)
        await conn.add_listener(CHANNEL, self._notified)
        conn.add_termination_listener(self._lost)
        self._conn = conn
        self._notified()  # anything may have committed while we were not listening

    async def _reconnect(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                await self._connect()
                return
            except Exception:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def start(self) -> None:
        try:
            await self._connect()
        except Exception as e:  # polling still works; keep trying to listen in the background
            log.warning("listen connection failed, polling until it is back", error=str(e))
            self._task = asyncio.get_running_loop().create_task(self._reconnect())

    async def close(self) -> None:
        self._closed = True
        if self._task:
            self._task.cancel()
        if self._conn is not None and not self._conn.is_closed():
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)
