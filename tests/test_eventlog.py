"""The event log against a real Postgres: concurrency, idempotency, reading and subscriptions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import pickle
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from events import ANY, NO_STREAM, NewEvent, RecordedEvent, UnknownEventType
from events.envelope import Meta, new_id, validate_stream
from events.hub import AgentCreated, AgentSettings, AgentStarted
from events.registry import EventData, EventSpec, registry
from storage.errors import EventTooLarge, InvalidEvent, StoreUnavailable, WrongExpectedVersion, translate_errors
from storage.eventlog import (
    CHANNEL,
    HEAD_SQL,
    READ_COMMITTED_SQL,
    START,
    AfterPosition,
    Checkpoint,
    EventLog,
    wait_at_most,
)
from storage.export import export_parquet
from tests.conftest import count_calls, eventually


def started() -> NewEvent:
    return NewEvent.of(AgentStarted())


async def _append_in(conn: asyncpg.Connection, stream: str) -> None:
    """Append one event on ``conn``, in whatever transaction the caller holds open there."""
    await conn.fetch(
        "SELECT * FROM agenthub_append($1, 'any', 0, $2::uuid[], $3::text[], $4::jsonb[], $5::jsonb[], "
        "NULL, NULL, NULL, NULL, true)",
        stream,
        [started().id],
        ["agent.started"],
        ["{}"],
        ['{"schema_version": 1}'],
    )


async def test_append_assigns_versions_and_positions(eventlog: EventLog) -> None:
    r1 = await eventlog.append(
        "agent-a", [NewEvent.of(AgentCreated(agent_id="a", name="A", settings=AgentSettings()))], NO_STREAM
    )
    r2 = await eventlog.append("agent-a", [started(), started()], 1)
    assert r1.versions == [1] and r2.versions == [2, 3]
    assert r2.positions[0] > r1.positions[0]
    events = await eventlog.read_stream("agent-a")
    assert [e.version for e in events] == [1, 2, 3]
    assert events[0].payload() == AgentCreated(agent_id="a", name="A", settings=AgentSettings())
    assert await eventlog.stream_version("agent-a") == 3


async def test_wrong_expected_version_is_rejected_by_the_database(eventlog: EventLog) -> None:
    await eventlog.append("agent-b", [started()], NO_STREAM)
    with pytest.raises(WrongExpectedVersion) as exc:
        await eventlog.append("agent-b", [started()], NO_STREAM)
    assert exc.value.actual == 1
    with pytest.raises(WrongExpectedVersion):
        await eventlog.append("agent-b", [started()], 5)  # ahead of the stream: no gaps allowed
    with pytest.raises(WrongExpectedVersion):
        await eventlog.append("agent-new", [started()], 1)  # stream does not exist
    assert await eventlog.stream_version("agent-b") == 1


async def test_concurrent_writers_with_same_expected_version_one_wins(eventlog: EventLog) -> None:
    await eventlog.append("agent-c", [started()], NO_STREAM)
    results = await asyncio.gather(
        *[eventlog.append("agent-c", [started()], 1) for _ in range(10)], return_exceptions=True
    )
    assert sum(1 for r in results if not isinstance(r, Exception)) == 1
    assert all(isinstance(r, WrongExpectedVersion) for r in results if isinstance(r, Exception))
    assert await eventlog.stream_version("agent-c") == 2


async def test_idempotent_append_returns_original_positions(eventlog: EventLog) -> None:
    first = await eventlog.append("agent-d", [started(), started()], ANY, idempotency_key="cmd-1")
    again = await eventlog.append("agent-d", [started(), started()], ANY, idempotency_key="cmd-1")
    assert again.positions == first.positions and again.replayed and not first.replayed
    concurrent = await asyncio.gather(
        *[eventlog.append("agent-d", [started()], ANY, idempotency_key="cmd-2") for _ in range(8)]
    )
    assert len({tuple(r.positions) for r in concurrent}) == 1
    assert await eventlog.stream_version("agent-d") == 3


async def test_a_key_taken_meanwhile_fails_an_append_in_the_callers_transaction(eventlog: EventLog) -> None:
    """Inside the caller's transaction, losing the key to another transaction aborts that transaction: the append
    must fail, not answer the other's positions as if it had succeeded (the caller's other writes are gone)."""
    async with eventlog.connection() as first, eventlog.connection() as second:
        t1, t2 = first.transaction(), second.transaction()
        await t1.start()
        await t2.start()
        await eventlog.append("agent-k1", [started()], idempotency_key="fork-1", conn=first)
        losing = asyncio.create_task(eventlog.append("agent-k2", [started()], idempotency_key="fork-1", conn=second))
        await asyncio.sleep(0.2)  # waits on the key's index entry
        await t1.commit()
        with pytest.raises(asyncpg.UniqueViolationError):
            await losing
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await second.fetchval("SELECT 1")
        await t2.rollback()
    assert [e.stream for e in await eventlog.read_all()] == ["agent-k1"]


async def test_unknown_type_invalid_payload_and_oversized_are_rejected(eventlog: EventLog) -> None:
    with pytest.raises(UnknownEventType):
        await eventlog.append("agent-e", [NewEvent(type="no.such_event", data={})])
    with pytest.raises(ValidationError):
        await eventlog.append("agent-e", [NewEvent(type="agent.created", data={"agent_id": "e"})])
    big = AgentCreated(agent_id="e", name="x" * 5000, settings=AgentSettings())
    with pytest.raises(EventTooLarge):
        await eventlog.append("agent-e", [NewEvent.of(big)])
    with pytest.raises(ValueError, match="invalid stream"):
        await eventlog.append("Bad Stream", [started()])
    assert await eventlog.stream_version("agent-e") == 0  # nothing was written


async def test_read_all_filters(eventlog: EventLog) -> None:
    await eventlog.append("agent-f", [NewEvent.of(AgentCreated(agent_id="f", name="F", settings=AgentSettings()))])
    await eventlog.append("other-g", [started()])
    await eventlog.append("agent-f", [started()])
    assert [e.type for e in await eventlog.read_all(types=["agent.started"])] == ["agent.started"] * 2
    assert [e.stream for e in await eventlog.read_all(stream="other-g")] == ["other-g"]
    all_ = await eventlog.read_all()
    assert [e.position for e in await eventlog.read_all(all_[0].position)] == [e.position for e in all_[1:]]


async def test_subscriber_never_skips_an_event_committed_out_of_order(eventlog: EventLog, db_url: str) -> None:
    """Trap 1: a transaction holding a lower position commits after later ones."""
    seen: list[int] = []

    async def consume() -> None:
        async for batch, _ in eventlog.subscribe(START, poll_interval=0.2):
            seen.extend(e.position for e in batch)
            if len(seen) >= 6:
                return

    task = asyncio.create_task(consume())
    await eventlog.append("agent-h", [started()])
    slow = await asyncpg.connect(db_url)
    tx = slow.transaction()
    await tx.start()
    await _append_in(slow, "agent-slow")
    for _ in range(4):
        await eventlog.append("agent-h", [started()])
    await asyncio.sleep(0.5)
    # the subscriber must not have moved past the open transaction's event
    slow_pos = await slow.fetchval("SELECT position FROM events WHERE stream = 'agent-slow'")
    assert all(p < slow_pos for p in seen)
    await tx.commit()
    await slow.close()
    await asyncio.wait_for(task, 10)
    all_events = await eventlog.read_all()
    assert sorted(seen) == [e.position for e in all_events] and len(seen) == len(set(seen)) == 6
    # delivered in (transaction id, position) order: stable, whatever order the commits raced in
    assert seen == [e.position for e in sorted(all_events, key=lambda e: e.cursor)]
    # a second subscriber from the start sees the same stable order
    again: list[int] = []
    async for batch, _ in eventlog.subscribe(START):
        again.extend(e.position for e in batch)
        if len(again) >= 6:
            break
    assert again == seen


async def test_a_long_transaction_costs_a_follower_a_few_reads_a_second_and_its_commit_is_seen(
    eventlog: EventLog, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits held back behind an open transaction are looked for again soon, then less and less often (it
    used to be every 5 ms for as long as it stayed open); one that wrote no event sends no NOTIFY, and its
    commit is still seen within the longest wait."""
    reads = count_calls(monkeypatch, eventlog, "read_committed")
    slow = await asyncpg.connect(db_url)
    try:
        tx = slow.transaction()
        await tx.start()
        await slow.fetchval("SELECT pg_current_xact_id()")  # a transaction id, and no event: no NOTIFY at commit
        await eventlog.append("agent-after", [started()])
        got: list[RecordedEvent] = []

        async def follow() -> None:
            async for batch, _ in eventlog.subscribe(START, poll_interval=60):
                got.extend(batch)

        follower = asyncio.create_task(follow())
        await asyncio.sleep(1.0)
        assert got == [] and 5 <= len(reads) <= 30  # 5, 10, 20, 40, 80, then every 100 ms: ~14 (was ~200)
        await tx.commit()
        for _ in range(50):
            if got:
                break
            await asyncio.sleep(0.02)
        assert [e.stream for e in got] == ["agent-after"]
        follower.cancel()
    finally:
        await slow.close()


async def test_a_subscriber_from_the_head_gets_exactly_what_commits_after_it(eventlog: EventLog, db_url: str) -> None:
    """Only new events (the SSE stream, ``tail --follow``): with an older append still open, a younger one that
    committed before the head was taken is not new, and the older one, committing after, is."""
    await eventlog.append("agent-before", [started()])
    slow = await asyncpg.connect(db_url)
    tx = slow.transaction()
    await tx.start()
    await _append_in(slow, "agent-slow")
    await eventlog.append("agent-young", [started() for _ in range(3)])  # committed above the open transaction's id
    head = await eventlog.head_cursor()
    assert len(head.seen) == 1  # the young transaction: the only commit above the horizon
    seen: list[str] = []

    async def consume() -> None:
        async for batch, _ in eventlog.subscribe(head, poll_interval=0.2, batch_size=2):  # batches end mid-transaction
            seen.extend(e.stream for e in batch)
            if "agent-after" in seen:
                return

    task = asyncio.create_task(consume())
    await tx.commit()
    await slow.close()
    await eventlog.append("agent-after", [started()])
    await asyncio.wait_for(task, 10)
    assert seen == ["agent-slow", "agent-after"]
    # the plain cursor is the horizon: it delivers the young commit again (what the orchestrator's restore expects)
    again = await eventlog.read_committed(head.cursor)
    assert [e.stream for e in again.events] == ["agent-slow", *["agent-young"] * 3, "agent-after"]


async def test_events_held_back_by_a_silent_transaction_arrive_without_waiting_for_the_poll(
    eventlog: EventLog, db_url: str
) -> None:
    blocker = await asyncpg.connect(db_url)
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("INSERT INTO secrets (ref, value) VALUES ('held', 'x')")  # an open write: no NOTIFY
    await eventlog.append("agent-held", [started()])  # committed, but behind the open transaction
    first = await eventlog.read_committed(START)
    assert first.events == [] and first.cursor == START and first.held_back

    seen: list[str] = []

    async def follow() -> None:
        async for batch, _ in eventlog.subscribe(START, poll_interval=60):
            seen.extend(e.stream for e in batch)
            if seen:
                return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    assert seen == []  # still held back
    await tx.commit()  # commits without a NOTIFY: the subscriber must not wait for its 60 s poll
    await blocker.close()
    await asyncio.wait_for(task, 5)
    assert seen == ["agent-held"]
    assert not (await eventlog.read_committed(START)).held_back


async def test_a_read_names_the_transaction_that_holds_events_back(eventlog: EventLog, db_url: str) -> None:
    """What the orchestrator reports when a transaction left open stalls every subscriber (actors/held_back.py)."""
    blocker = await asyncpg.connect(db_url, server_settings={"application_name": "stuck-batch-job"})
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("INSERT INTO secrets (ref, value) VALUES ('holder', 'x')")
    xid = await blocker.fetchval("SELECT pg_current_xact_id()")
    await eventlog.append("agent-behind", [started()])
    got = await eventlog.read_committed(START)
    assert got.held_by == int(xid) and got.held_back and got.events == []
    holder = await eventlog.describe_transaction(got.held_by)
    assert holder is not None
    assert holder["pid"] == blocker.get_server_pid() and holder["application"] == "stuck-batch-job"
    assert holder["state"] == "idle in transaction" and holder["query"] == "SELECT pg_current_xact_id()"
    assert holder["open_s"] >= 0 and "prepared_gid" not in holder
    await tx.commit()
    await blocker.close()
    assert await eventlog.describe_transaction(got.held_by) is None  # ended: nobody to name
    after = await eventlog.read_committed(START)
    assert after.held_by is None and [e.stream for e in after.events] == ["agent-behind"]


async def test_a_subscriber_misses_no_commit_made_while_it_handles_a_batch(eventlog: EventLog) -> None:
    """A commit while the subscriber handles a batch must still reach it, and a full batch is followed by the next
    read at once (both under a 60 s poll, so neither may rest on polling)."""
    for i in range(5):
        await eventlog.append(f"agent-early{i}", [started()])
    seen: list[str] = []

    async def follow() -> None:
        async for batch, _ in eventlog.subscribe(START, batch_size=2, poll_interval=60):
            seen.extend(e.stream for e in batch)
            if len(seen) == 5:
                await eventlog.append("agent-during", [started()])  # commits while this batch is handled
            if len(seen) == 6:
                return

    await asyncio.wait_for(follow(), 5)
    assert seen == [f"agent-early{i}" for i in range(5)] + ["agent-during"]


async def test_appends_notify_once_per_transaction_at_its_commit(eventlog: EventLog, db_url: str) -> None:
    """One NOTIFY per committed transaction (trap 2), sent by the transaction itself: a lone append notifies, and
    concurrent appends that share a group commit send one between them."""
    heard: list[str] = []
    listener = await asyncpg.connect(db_url)
    await listener.add_listener(CHANNEL, lambda *args: heard.append(args[2]))
    try:
        await eventlog.append("agent-n", [started()])
        await eventually(lambda: _at_least(heard, 1), 5, "the NOTIFY of a lone append")
        heard.clear()
        batches = eventlog.group.batches
        await asyncio.gather(*(eventlog.append(f"agent-n{i}", [started()]) for i in range(40)))
        transactions = eventlog.group.batches - batches
        assert transactions < 40  # they did share transactions
        await eventually(lambda: _at_least(heard, transactions), 5, "a NOTIFY per transaction")
        await asyncio.sleep(0.3)
        assert len(heard) == transactions and set(heard) == {CHANNEL}
    finally:
        await listener.close()


async def _at_least(items: list[str], n: int) -> bool:
    return len(items) >= n


async def test_checkpoint_written_in_the_same_transaction_as_an_append(eventlog: EventLog) -> None:
    await eventlog.append("agent-i", [started()])
    ev = (await eventlog.read_all())[0]
    await eventlog.append("agent-j", [started()], checkpoint=Checkpoint("sub-1", ev.cursor))
    assert await eventlog.load_checkpoint("sub-1") == ev.cursor
    # a failed append leaves the checkpoint where it was
    with pytest.raises(WrongExpectedVersion):
        await eventlog.append("agent-j", [started()], 7, checkpoint=Checkpoint("sub-1", (ev.tx_id + 99, 99)))
    assert await eventlog.load_checkpoint("sub-1") == ev.cursor
    assert await eventlog.load_checkpoint("nobody") == START


async def test_snapshots_keep_the_newest(eventlog: EventLog) -> None:
    await eventlog.save_snapshot("agent-k", 10, {"n": 10})
    await eventlog.save_snapshot("agent-k", 5, {"n": 5})
    assert await eventlog.load_snapshot("agent-k") == (10, {"n": 10})
    assert await eventlog.load_snapshot("agent-none") is None


async def test_upcaster_lifts_old_payloads_on_read(eventlog: EventLog) -> None:
    from events.registry import EventData, Registry

    reg = Registry()

    class Renamed(EventData):
        full_name: str

    reg.register("test.renamed", Renamed, schema_version=2)

    @reg.upcaster("test.renamed", from_version=1)
    def _v1_to_v2(data: dict) -> dict:
        return {"full_name": data.pop("name")}

    assert reg.decode("test.renamed", {"name": "Ada"}, 1) == Renamed(full_name="Ada")
    assert reg.decode("test.renamed", {"full_name": "Ada"}, 2) == Renamed(full_name="Ada")
    with pytest.raises(ValueError, match="no upcaster"):
        reg.register("test.other", Renamed, schema_version=3)
        reg.decode("test.other", {}, 1)


# ---- a throwaway event type at schema version 2, registered for one test ----------------------------------------


class _RenamedV2(EventData):
    full_name: str
    n: int = 0
    extra: dict[str, Any] = {}


@pytest.fixture
def renamed_v2(monkeypatch: pytest.MonkeyPatch) -> str:
    """``test.renamed`` at schema version 2; version 1 called ``full_name`` ``name``."""
    spec = EventSpec("test.renamed", _RenamedV2, 2, {1: lambda d: {"full_name": d.pop("name"), **d}})
    monkeypatch.setitem(registry._by_name, spec.name, spec)
    monkeypatch.setitem(registry._by_model, _RenamedV2, spec)
    return spec.name


async def test_an_event_upcast_at_append_is_stored_at_the_current_schema_version(
    eventlog: EventLog, renamed_v2: str
) -> None:
    await eventlog.append("user-1", [NewEvent(type=renamed_v2, data={"name": "Ada"})])  # a v1 payload (meta's default)
    await eventlog.append("user-1", [NewEvent.of(_RenamedV2(full_name="Grace"))])  # already v2
    events = await eventlog.read_stream("user-1")
    assert [e.meta.schema_version for e in events] == [2, 2]
    assert events[0].data == {"full_name": "Ada", "n": 0, "extra": {}}
    assert [e.payload() for e in events] == [_RenamedV2(full_name="Ada"), _RenamedV2(full_name="Grace")]


async def test_input_the_database_cannot_store_is_a_typed_error_and_fails_only_its_own_append(
    eventlog: EventLog, renamed_v2: str
) -> None:
    def named(**data: Any) -> NewEvent:
        return NewEvent.of(_RenamedV2(full_name="x", **data))

    def completed(**data: Any) -> NewEvent:  # as a client sends it (JSON parsed by ``json.loads`` may hold NaN)
        counts = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        fields = {"agent_id": "a", "provider": "p", "model": "m", "text": "t", "request_hash": "h", **counts}
        return NewEvent(type="llm.completed", data={**fields, "latency_ms": 1.0, **data})

    bad: list[tuple[str, Any]] = [
        ("NUL in data", eventlog.append("user-2", [NewEvent.of(_RenamedV2(full_name="a\x00b"))])),
        ("NUL in a nested key", eventlog.append("user-2", [named(extra={"k\x00": 1})])),
        ("NUL in meta", eventlog.append("user-2", [NewEvent.of(AgentStarted(), actor="api\x00")])),
        (
            "NUL in client meta",
            eventlog.append("user-2", [NewEvent(type="agent.started", data={}, meta=Meta(x=["\x00"]))]),
        ),
        ("NUL in the idempotency key", eventlog.append("user-2", [started()], idempotency_key="k\x00")),
        ("int beyond 64 bits in data", eventlog.append("user-2", [named(n=2**64)])),
        (
            "int beyond 64 bits in meta",
            eventlog.append("user-2", [NewEvent(type="agent.started", data={}, meta=Meta(x=-(2**70)))]),
        ),
        ("expected version beyond bigint", eventlog.append("user-2", [started()], 2**63)),
        ("negative expected version", eventlog.append("user-2", [started()], -1)),
        ("stream with a trailing newline", eventlog.append("user-2\n", [started()])),
        # orjson writes these as null, which the model's float field would refuse on every later read
        ("infinity in a nested value", eventlog.append("user-2", [named(extra={"score": [-math.inf]})])),
        ("NaN in meta", eventlog.append("user-2", [NewEvent(type="agent.started", data={}, meta=Meta(x=math.nan))])),
    ]
    good = [eventlog.append(f"user-ok{i}", [named()]) for i in range(3)]
    results = await asyncio.gather(*(c for _, c in bad), *good, return_exceptions=True)
    for (what, _), r in zip(bad, results, strict=False):
        assert isinstance(r, InvalidEvent), f"{what}: {r!r}"
    assert all(not isinstance(r, BaseException) for r in results[len(bad) :]), results[len(bad) :]
    assert await eventlog.stream_version("user-2") == 0
    assert not [e for e in await eventlog.read_all() if e.stream == "user-2\n"]
    with pytest.raises(ValidationError, match="finite number"):  # a typed field refuses it as invalid input
        await eventlog.append("user-2", [completed(latency_ms=math.nan)])
    # a real null is kept: only a float that JSON cannot hold is refused
    await eventlog.append("user-2", [named(extra={"score": None})])
    # \\u0000 as text (a backslash, then "u0000") is no NUL and is stored as it is
    await eventlog.append("user-2", [NewEvent.of(_RenamedV2(full_name="\\u0000"))])
    assert (await eventlog.read_stream("user-2"))[1].data["full_name"] == "\\u0000"


async def test_meta_counts_against_the_event_size_limit(eventlog: EventLog) -> None:
    with pytest.raises(EventTooLarge):  # the fixture's limit is 4096 bytes
        await eventlog.append("agent-meta", [NewEvent(type="agent.started", data={}, meta=Meta(note="x" * 5000))])
    assert await eventlog.stream_version("agent-meta") == 0


async def test_the_size_limit_counts_bytes_and_text_is_stored_exactly(eventlog: EventLog) -> None:
    """Russian and Chinese text takes 2-3 bytes a character: 2,000 characters fit a 4,096-character limit but not
    4,096 bytes. What fits is stored character for character (escapes, quotes, emoji included)."""
    with pytest.raises(EventTooLarge):
        await eventlog.append(
            "agent-utf", [NewEvent.of(AgentCreated(agent_id="u", name="машина" * 333, settings=AgentSettings()))]
        )
    name = 'Джарвис 贾维斯 "quoted" \\ back\\slash \n newline 🚗 \u2028'
    await eventlog.append("agent-utf", [NewEvent.of(AgentCreated(agent_id="u", name=name, settings=AgentSettings()))])
    [event] = await eventlog.read_stream("agent-utf")
    assert event.data["name"] == name


def test_a_stream_name_is_matched_whole() -> None:
    for bad in ("agent-7\n", "agent-7\x00", "agent-a\tb", "agent-", "Agent-7", "agent-" + "x" * 201):
        with pytest.raises(ValueError, match="invalid stream"):
            validate_stream(bad)
    assert validate_stream("agent-7") == "agent-7" and validate_stream("chat-a/b:c") == "chat-a/b:c"


async def test_an_outage_expires_the_pooled_connections(eventlog: EventLog) -> None:
    async with eventlog.connection() as c:
        before = await c.fetchval("SELECT pg_backend_pid()")
    with pytest.raises(StoreUnavailable):
        async with eventlog.connection():
            raise ConnectionResetError("connection lost")  # as a dropped connection surfaces
    async with eventlog.connection() as c:  # a fresh connection, not the pooled one of before the outage
        assert await c.fetchval("SELECT pg_backend_pid()") != before


async def test_a_pooled_connection_the_server_ended_is_an_outage_and_is_replaced(db_url: str) -> None:
    """The server ends an idle pooled connection (a restart, ``pg_terminate_backend``) and the process reads its
    farewell error one loop turn before the socket's close: a query sent in between fails inside asyncpg
    (``InternalClientError``, "another operation is in progress"). That is an outage to retry, and the next call
    gets a new connection. Taken for a handler's bug, it answered a message being handled as failed, or left it
    unanswered when the failure's own record failed the same way: the chaos run (bench/chaos.py) found it."""
    log = await EventLog.connect(db_url, max_size=1, run_migrations=False)  # one connection: the one ended
    kinds: Counter[str] = Counter()

    def end_backend(pid: int) -> None:
        """Ends it, waiting until it is gone, while this test's loop is blocked: its farewell and the socket's close
        both wait unread, as when a server stops under a busy process."""

        async def terminate() -> None:
            admin = await asyncpg.connect(db_url)
            try:
                assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
            finally:
                await admin.close()

        thread = threading.Thread(target=asyncio.run, args=(terminate(),))
        thread.start()
        thread.join()

    try:
        for _ in range(10):
            pid = await log.fetchval("SELECT pg_backend_pid()")
            end_backend(pid)
            await asyncio.sleep(0)  # the loop reads the farewell error; the close is read one turn later
            await asyncio.sleep(0)
            try:
                await log.fetchval("SELECT 1")
                kinds["ok"] += 1  # the close was read first: the pool opened a new connection
            except StoreUnavailable as e:
                kinds[type(e.__cause__).__name__] += 1
            assert await log.fetchval("SELECT pg_backend_pid()") != pid  # the pool opened a new connection
    finally:
        await log.close()
    assert kinds["InternalClientError"] > 0, kinds  # the way that was taken for a bug did come up


def test_an_unreachable_database_is_told_to_clients_without_its_address() -> None:
    with pytest.raises(StoreUnavailable) as caught, translate_errors():
        raise ConnectionRefusedError(111, "Connect call failed ('10.1.2.3', 5433)")
    e = caught.value
    assert "10.1.2.3" in str(e) and "5433" in str(e)  # for the logs
    assert e.public == "event store unavailable (ConnectionRefusedError)"  # for an HTTP client
    again = pickle.loads(pickle.dumps(e))  # as Ray carries it from one actor to another
    assert (str(again), again.public) == (str(e), e.public)


async def test_a_server_that_cannot_write_now_is_an_outage_not_an_error(eventlog: EventLog, db_url: str) -> None:
    """A standby, or a primary a failover demoted, refuses writes: that is a 503 to retry later, and a redelivery
    for a subscriber, not an internal error (HTTP 500) or a message answered as failed."""
    async with eventlog.connection() as c:
        await c.execute(
            f"ALTER DATABASE {await c.fetchval('SELECT current_database()')} SET default_transaction_read_only = on"
        )
    standby = await EventLog.connect(db_url, run_migrations=False)  # new connections: read only
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await standby.append("agent-ro", [started()])
        assert caught.value.public == "event store unavailable (ReadOnlySQLTransactionError)"
        assert await standby.read_all() == []  # reads go on
    finally:
        await standby.close()
        async with eventlog.connection() as c:
            await c.execute(
                f"ALTER DATABASE {await c.fetchval('SELECT current_database()')} RESET default_transaction_read_only"
            )


async def test_cursor_at_a_position_without_an_event_resumes_as_read_all_does(eventlog: EventLog) -> None:
    assert await eventlog.cursor_at(0) == START
    assert await eventlog.cursor_at(5) == START  # nothing at or before it
    first = await eventlog.append("agent-p", [started()])
    async with eventlog.connection() as c:  # an aborted append leaves a gap in the positions
        tx = c.transaction()
        await tx.start()
        gap = (await eventlog.append("agent-p", [started()], conn=c)).positions[0]
        await tx.rollback()
    after = await eventlog.append("agent-p", [started()])
    first_event = (await eventlog.read_all())[0]  # read_stream leaves tx_id out
    assert await eventlog.cursor_at(first.positions[0]) == first_event.cursor
    assert await eventlog.cursor_at(gap) == first_event.cursor
    resumed = await eventlog.read_committed(await eventlog.cursor_at(gap))
    assert [e.position for e in resumed.events] == [e.position for e in await eventlog.read_all(gap)]
    assert [e.position for e in resumed.events] == after.positions
    head = (await eventlog.head_cursor()).cursor
    assert await eventlog.cursor_at(after.positions[0] + 1000) == head  # past the head: only new events
    assert await eventlog.cursor_at(2**70) == head


@contextlib.asynccontextmanager
async def older_transaction(eventlog: EventLog, stream: str) -> AsyncIterator[asyncpg.Connection]:
    """A transaction that holds ``stream``'s lock and a transaction id older than any append made in the block,
    committed at its end: what it appends gets a higher position than those but comes first in commit order."""
    async with eventlog.connection() as older, older.transaction():
        await eventlog.lock_streams(older, [stream])
        await older.fetchval("SELECT pg_current_xact_id()")
        yield older


async def test_a_subscription_after_a_position_gets_an_event_above_it_from_an_older_transaction(
    eventlog: EventLog,
) -> None:
    """A reader lists up to position p and follows from there; an older transaction then commits p + 1. From the
    cursor of the event at p (commit order), p + 1 comes before it and was never delivered."""
    await eventlog.append("agent-before", [started()])
    async with older_transaction(eventlog, "agent-older") as older:
        listed = (await eventlog.append("agent-younger", [started()])).positions[0]
        late = (await eventlog.append("agent-older", [started()], conn=older)).positions[0]
    assert late > listed
    got: list[int] = []

    async def follow(after: Any) -> list[int]:
        async for batch, _ in eventlog.subscribe(after, poll_interval=0.2):
            got.extend(e.position for e in batch)
            if late in got:
                break
        return got

    assert await asyncio.wait_for(follow(AfterPosition(listed)), 5) == [late]  # nothing at or below it again
    old = eventlog.read_committed(await eventlog.cursor_at(listed))
    assert late not in [e.position for e in (await old).events]  # what the cursor at the position misses


async def test_last_cursor_is_the_last_committed_event_in_commit_order_not_the_highest_position(
    eventlog: EventLog,
) -> None:
    """An older transaction commits a higher position after a younger one: the last cursor is the younger one's
    event (the later in commit order), so a subscriber that reached it has every committed event; an event not
    committed yet is not counted."""
    assert await eventlog.last_cursor() == START
    async with older_transaction(eventlog, "agent-older") as older:
        younger = (await eventlog.append("agent-younger", [started()])).positions[0]
        higher = (await eventlog.append("agent-older", [started()], conn=older)).positions[0]
        by_position = {e.position: e.cursor for e in await eventlog.read_all()}
        assert await eventlog.last_cursor() == by_position[younger]  # the open transaction's event is not in it
    committed = await eventlog.read_all()
    assert higher > younger and len(committed) == 2
    last = await eventlog.last_cursor()
    assert last == next(e.cursor for e in committed if e.position == younger)
    assert all(e.cursor <= last for e in committed)


async def test_checkpoints_only_move_forward(eventlog: EventLog) -> None:
    await eventlog.save_checkpoint("proj", (10, 20))
    await eventlog.save_checkpoints({"proj": (9, 30), "other": (1, 1)})  # a flush that captured an older cursor
    await eventlog.save_checkpoint("proj", (10, 19))
    async with eventlog.connection() as c, c.transaction():
        await eventlog.save_checkpoint("proj", (10, 5), conn=c)
    await eventlog.append("agent-q", [started()], checkpoint=Checkpoint("proj", (3, 3)))
    assert await eventlog.load_checkpoint("proj") == (10, 20)
    assert await eventlog.load_checkpoint("other") == (1, 1)
    await eventlog.save_checkpoints({"proj": (10, 21)})
    assert await eventlog.load_checkpoint("proj") == (10, 21)
    await eventlog.append("agent-q", [started()], checkpoint=Checkpoint("proj", (11, 1)))
    assert await eventlog.load_checkpoint("proj") == (11, 1)


async def test_incremental_export_misses_no_event_committed_late(eventlog: EventLog, tmp_path: Path) -> None:
    await eventlog.append("agent-x0", [started()])
    async with eventlog.connection() as slow:  # holds a lower position while later appends commit
        tx = slow.transaction()
        await tx.start()
        await eventlog.append("agent-slow", [started()], conn=slow)
        await eventlog.append("agent-x2", [started()])
        await eventlog.append("agent-x3", [started()])
        first = await export_parquet(eventlog, tmp_path / "1.parquet")
        await tx.commit()
    rows1 = pq.read_table(tmp_path / "1.parquet").column("position").to_pylist()
    assert first == len(rows1)
    # resume from the last row written, as the docstring says
    second = await export_parquet(eventlog, tmp_path / "2.parquet", from_position=rows1[-1])
    rows2 = pq.read_table(tmp_path / "2.parquet").column("position").to_pylist()
    assert second == len(rows2)
    assert sorted(rows1 + rows2) == [e.position for e in await eventlog.read_all()]
    assert len(rows1 + rows2) == 4


async def test_subscriptions_of_one_process_share_one_listen_connection(eventlog: EventLog) -> None:
    """Each SSE client is a subscription; one LISTEN connection each would use up max_connections."""

    async def listening() -> int:
        return int(
            await eventlog.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )
        )

    async def first_live_event(ready: asyncio.Event) -> str:
        async for batch, _ in eventlog.subscribe(START, poll_interval=30):
            if batch[0].stream == "agent-live":
                return batch[0].stream
            ready.set()  # caught up; the next batch can only come live
        raise AssertionError("unreachable")

    await eventlog.append("agent-before", [NewEvent.of(AgentStarted())])

    readies = [asyncio.Event() for _ in range(5)]
    followers = [asyncio.ensure_future(first_live_event(r)) for r in readies]
    await eventually(lambda: _all_set(readies), 10, "the subscriptions to catch up")
    await eventually(lambda: _equals(listening(), 1), 10, "one LISTEN connection")
    await eventlog.append("agent-live", [NewEvent.of(AgentStarted())])
    # poll_interval=30: only the NOTIFY, through the shared connection, can wake them in time
    assert await asyncio.wait_for(asyncio.gather(*followers), 10) == ["agent-live"] * 5
    await eventually(lambda: _equals(listening(), 0), 10, "the last subscription to close the LISTEN connection")


async def _all_set(events: list[asyncio.Event]) -> bool:
    return all(e.is_set() for e in events)


async def _equals(value: Any, expected: int) -> bool:
    return await value == expected


async def test_a_read_near_the_head_does_not_scan_the_whole_log(eventlog: EventLog) -> None:
    """Every subscriber read asks whether newer transactions hold events back; that once scanned the whole table
    (the planner cannot estimate the snapshot horizon): a read then cost as much as the log was long. Taking the
    head compares with the same horizon."""
    for i in range(30):
        await eventlog.append(f"agent-big{i}", [started() for _ in range(100)])
    head = (await eventlog.head_cursor()).cursor
    near_head = (head[0], head[1] - 5)

    def nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
        return [node, *(n for child in node.get("Plans", []) for n in nodes(child))]

    async with eventlog.connection() as c:
        for analyze in (False, True):  # as between autovacuum's runs, and just after one
            if analyze:
                await c.execute("ANALYZE events")
            explain = f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {READ_COMMITTED_SQL}"
            [plan] = json.loads(await c.fetchval(explain, *near_head, 500, None))
            scans = [n["Node Type"] for n in nodes(plan["Plan"])]
            assert "Seq Scan" not in scans, (analyze, scans)
            assert plan["Plan"]["Shared Hit Blocks"] < 30  # a few index and heap pages, not the log's ~75
            [plan] = json.loads(await c.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {HEAD_SQL}"))
            assert plan["Plan"]["Shared Hit Blocks"] < 30, analyze  # the head too: index probes at the top
    assert len((await eventlog.read_committed(near_head)).events) == 5


def test_event_ids_are_standard_uuid7s_that_sort_in_creation_order() -> None:
    """Ids sort like the log (UUIDv7), and are the standard ``UUID`` type that pydantic, asyncpg and ``==`` expect."""
    ids = [new_id() for _ in range(1000)]
    assert all(type(i) is uuid.UUID and i.version == 7 for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_a_loop_waiting_for_a_wake_up_ends_when_cancelled_as_the_wake_up_comes() -> None:
    """``asyncio.wait_for`` on Python 3.11 returns the event's result instead of raising the cancellation when both
    come at once: a subscription's loop went on, and a reply follower's restart, which waits for its end, hung."""
    wake = asyncio.Event()
    turns = 0

    async def follow() -> None:
        nonlocal turns
        while True:
            await wait_at_most(wake, 10)
            wake.clear()
            turns += 1

    task = asyncio.create_task(follow())
    await asyncio.sleep(0)  # it waits
    wake.set()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    assert task in done and task.cancelled() and turns == 0


async def test_wait_at_most_returns_at_the_wake_up_or_the_timeout() -> None:
    wake = asyncio.Event()
    started = time.perf_counter()
    await wait_at_most(wake, 0.05)  # nobody sets it: the timeout, no error
    assert time.perf_counter() - started >= 0.05
    wake.set()
    started = time.perf_counter()
    await wait_at_most(wake, 10)
    assert time.perf_counter() - started < 1
