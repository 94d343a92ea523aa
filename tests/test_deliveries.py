"""Overlapping deliveries to one entity actor: other entities start at once, each entity keeps its order, and
the orchestrator's handled cursor never passes an event still being handled."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

import pytest

from actors import subscriber
from actors.config import RuntimeConfig
from actors.deliveries import InFlight
from actors.subscriber import EntityActor
from events import NewEvent, RecordedEvent
from events.hub import AgentStopped
from storage.errors import StoreUnavailable
from storage.eventlog import EventLog


class Gated(EntityActor):
    """Handles an event once the test opens the gate named by its ``reason``; remembers the order."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.failing: set[str] = set()
        self.handled: list[str] = []
        super().__init__(config, "gated")

    async def setup(self) -> None:
        return None

    def entity_of(self, event: RecordedEvent) -> tuple[str, str]:
        return ("gated", event.stream)

    async def handle(self, event: RecordedEvent) -> None:
        name = event.data["reason"]
        await self.gates[name].wait()
        if name in self.failing:
            raise StoreUnavailable("the store went away")
        self.handled.append(name)


async def events(log: EventLog, *placed: tuple[str, str]) -> list[RecordedEvent]:
    for stream, name in placed:
        await log.append(stream, [NewEvent.of(AgentStopped(reason=name))])
    return await log.read_all(0)


async def settled(task: asyncio.Task[object]) -> bool:
    await asyncio.sleep(0.05)
    return task.done()


@pytest.fixture
async def actor(db_url: str) -> AsyncIterator[Gated]:
    gated = Gated(RuntimeConfig(database_url=db_url))
    yield gated
    await gated.store.close()


async def test_a_later_delivery_overtakes_a_slow_one_but_not_its_entity(actor: Gated, eventlog: EventLog) -> None:
    a1, b1, a2 = await events(eventlog, ("agent-a", "a1"), ("agent-b", "b1"), ("agent-a", "a2"))
    first = asyncio.ensure_future(actor.deliver([a1], a1.cursor))
    second = asyncio.ensure_future(actor.deliver([b1], b1.cursor))
    third = asyncio.ensure_future(actor.deliver([a2], a2.cursor))
    actor.gates["b1"].set()
    actor.gates["a2"].set()
    await second  # another entity finished while a1 is still being handled
    assert actor.handled == ["b1"]
    assert not await settled(third)  # a2 waits for a1, the same entity's earlier event

    actor.gates["a1"].set()
    await asyncio.gather(first, third)
    assert actor.handled == ["b1", "a1", "a2"]


async def test_a_store_outage_fails_only_its_delivery(actor: Gated, eventlog: EventLog) -> None:
    a1, b1 = await events(eventlog, ("agent-a", "a1"), ("agent-b", "b1"))
    actor.failing.add("a1")
    first = asyncio.ensure_future(actor.deliver([a1], a1.cursor))
    second = asyncio.ensure_future(actor.deliver([b1], b1.cursor))
    actor.gates["b1"].set()
    actor.gates["a1"].set()
    with pytest.raises(StoreUnavailable):
        await first  # the orchestrator rewinds to its cursor, which never passed a1, and delivers again
    await second
    assert actor.handled == ["b1"]


async def test_an_entitys_later_delivery_fails_with_its_earlier_one_so_the_order_holds(
    actor: Gated, eventlog: EventLog
) -> None:
    """a1 fails (the store went away): a2 of the same entity, in a later delivery, must not be handled before a1
    is delivered again; it fails too, and both come again in order."""
    a1, a2 = await events(eventlog, ("agent-a", "a1"), ("agent-a", "a2"))
    actor.failing.add("a1")
    first = asyncio.ensure_future(actor.deliver([a1], a1.cursor))
    second = asyncio.ensure_future(actor.deliver([a2], a2.cursor))
    actor.gates["a2"].set()
    actor.gates["a1"].set()
    for delivery in (first, second):
        with pytest.raises(StoreUnavailable):
            await delivery
    assert actor.handled == []
    actor.failing.clear()
    await actor.deliver([a1, a2], a2.cursor)  # the redelivery
    assert actor.handled == ["a1", "a2"]


async def test_deliveries_started_out_of_order_are_handled_in_the_order_sent(actor: Gated, eventlog: EventLog) -> None:
    """Ray may start an async actor's calls out of order (a large batch waits for the object store): the second
    delivery, started first, waits for the first, so the entity's events are handled in the log's order."""
    a0, a1, a2 = await events(eventlog, ("agent-a", "a0"), ("agent-a", "a1"), ("agent-a", "a2"))
    for name in ("a0", "a1", "a2"):
        actor.gates[name].set()
    await actor.deliver([a0], a0.cursor)  # an earlier delivery: what it registered orders the next ones
    second = asyncio.ensure_future(actor.deliver([a2], a2.cursor, a1.cursor))
    assert not await settled(second)  # waits for the delivery that ends at a1
    await actor.deliver([a1], a1.cursor, a0.cursor)
    await second
    assert actor.handled == ["a0", "a1", "a2"]


async def test_a_delivery_whose_predecessor_never_comes_goes_on(
    actor: Gated, eventlog: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its call failed on the way: the orchestrator sends it again after a rewind, from a cursor behind what is
    registered, which waits for nothing; the one that came meanwhile waits at most ``ORDER_WAIT_S``."""
    monkeypatch.setattr(subscriber, "ORDER_WAIT_S", 0.2)
    a0, a1, a2 = await events(eventlog, ("agent-a", "a0"), ("agent-a", "a1"), ("agent-a", "a2"))
    for name in ("a0", "a1", "a2"):
        actor.gates[name].set()
    await actor.deliver([a0], a0.cursor)
    await asyncio.wait_for(actor.deliver([a2], a2.cursor, a1.cursor), 5)  # a1's delivery was lost
    await asyncio.wait_for(actor.deliver([a1, a2], a2.cursor, a0.cursor), 5)  # the redelivery after the rewind
    assert actor.handled == ["a0", "a2", "a1", "a2"]  # the handler's own causation check skips a repeat


class StartsLate(Gated):
    """Its start fails the first time (the database was away for a moment when the actor came up)."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.setups = 0
        super().__init__(config)

    async def setup(self) -> None:
        self.setups += 1
        if self.setups == 1:
            raise StoreUnavailable("the store was away at start")


async def test_a_failed_start_is_tried_again_by_the_next_call(db_url: str, eventlog: EventLog) -> None:
    actor = StartsLate(RuntimeConfig(database_url=db_url))
    try:
        (a1,) = await events(eventlog, ("agent-a", "a1"))
        for _ in range(100):  # the start begun in the constructor fails
            if actor.setups == 1:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.02)
        actor.gates["a1"].set()
        await actor.deliver([a1], a1.cursor)  # not the cached failure: the call starts the actor again
        assert actor.handled == ["a1"] and actor.setups == 2
        assert (await actor.ping())["subscriber"] == "gated"
        assert actor.setups == 2  # started once, for good
    finally:
        await actor.store.close()


def test_the_handled_cursor_waits_for_every_earlier_delivery() -> None:
    window = InFlight()
    first, second, third = window.sent((1, 10)), window.sent((1, 20)), window.sent((2, 5))
    assert window.finished(second) is None  # done, but the first is not
    assert window.finished(first) == (1, 20)  # both done: past the second
    fourth = window.sent((2, 9))
    assert window.finished(fourth) is None and len(window) == 2
    assert window.finished(third) == (2, 9)
    assert len(window) == 0
    window.sent((3, 1))
    window.clear()  # a rewind forgets what was in flight
    assert len(window) == 0
