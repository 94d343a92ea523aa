"""The event log against a real Postgres: concurrency, idempotency, reading and subscriptions."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from pydantic import ValidationError

from events import ANY, NO_STREAM, NewEvent, UnknownEventType
from events.hub import AgentCreated, AgentSettings, AgentStarted
from storage.errors import EventTooLarge, WrongExpectedVersion
from storage.eventlog import CHANNEL, START, Checkpoint, EventLog
from tests.conftest import eventually


def started() -> NewEvent:
    return NewEvent.of(AgentStarted())


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
    assert [e.stream for e in await eventlog.read_all(category="other")] == ["other-g"]
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
    await slow.fetch(
        "SELECT * FROM agenthub_append('agent-slow', 'any', 0, $1::uuid[], $2::text[], $3::jsonb[], $4::jsonb[], "
        "NULL, NULL, NULL, NULL, true)",
        [started().id],
        ["agent.started"],
        ["{}"],
        ['{"schema_version": 1}'],
    )
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
