"""The watch that tells one long hold from many short ones (actors/held_back.py), on a clock of its own."""

from __future__ import annotations

from typing import Any

from actors.held_back import REPEAT_S, HoldWatch, hold_summary


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


HOLDER = {"pid": 4242, "application": "etl", "state": "idle in transaction", "query": "UPDATE t SET x = 1"}


class Lookups:
    def __init__(self) -> None:
        self.asked: list[int] = []

    async def __call__(self, tx: int) -> dict[str, Any] | None:
        self.asked.append(tx)
        return HOLDER


async def test_many_short_holds_in_a_row_are_not_one_long_hold() -> None:
    clock, describe = Clock(), Lookups()
    watch = HoldWatch(warn_after_s=10, clock=clock)
    for tx in range(100, 130):  # a busy log: a different transaction holds each read, for 30 s
        clock.now += 1
        await watch.seen(tx, describe)
    assert describe.asked == [] and watch.report() is None and watch.seconds() == 0


async def test_one_long_hold_is_reported_once_then_every_repeat_and_forgotten_when_it_ends() -> None:
    clock, describe = Clock(), Lookups()
    watch = HoldWatch(warn_after_s=10, clock=clock)
    for clock.now in (0.0, 9.9):
        await watch.seen(7, describe)
    assert describe.asked == [] and watch.report() is None
    for clock.now in (10.0, 10.0 + REPEAT_S - 1):
        await watch.seen(7, describe)
    assert describe.asked == [7]  # looked up once, not at every read
    assert watch.report() == {"transaction": 7, "for_s": 10.0 + REPEAT_S - 1, **HOLDER}
    clock.now = 10.0 + REPEAT_S
    await watch.seen(7, describe)
    assert describe.asked == [7, 7]
    clock.now += 1
    await watch.seen(None, describe)
    assert watch.hold is None and watch.report() is None and watch.seconds() == 0


async def test_a_failed_lookup_still_reports_the_hold() -> None:
    async def down(tx: int) -> dict[str, Any] | None:
        raise ConnectionError("database went away")

    watch = HoldWatch(warn_after_s=0)
    await watch.seen(9, down)
    assert watch.hold is not None and "database went away" in watch.hold.holder["lookup_error"]


def test_the_health_line_names_what_is_known() -> None:
    line = hold_summary({"transaction": 812, "for_s": 42.4, "pid": 4242, "application": "etl", "query": "UPDATE t"})
    assert line.startswith("committed events held back for 42 s by open transaction 812 (pid 4242, ")
    assert "application 'etl'" in line and "query 'UPDATE t'" in line and line.endswith("replies wait until it ends")
    assert "(" not in hold_summary({"transaction": 5, "for_s": 1.0})  # nothing looked up: no empty brackets
