"""Every fault at once, at random moments under load (bench/chaos.py): nothing acknowledged is lost, nothing is
answered or done twice, the agents' chat state, the team's tasks, decisions and merges and the projections agree
with the log."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable

from bench.chaos import FAULTS, NOT_ANSWERING, chaos, settled
from cluster.bootstrap import System


async def test_random_faults_under_load_lose_and_repeat_nothing(system: System) -> None:
    # at least 25 s, and on until 200 messages and 50 tasks: CI's slowed machine once recorded 150 messages in 25 s
    run = await chaos(system, seconds=25, seed=7, every=(1.5, 3.0), at_least=(201, 51))
    assert not run.violations, run.violations
    assert set(run.faults) == set(FAULTS), run.faults  # the seed draws each kind; each one hit its target
    assert len(run.sent) > 200 and sum(s.tries - 1 for s in run.sent) > 0  # under load, and some were sent again
    assert len(run.tasks) > 50 and run.implements  # the team worked meanwhile, TDD tasks in git included
    # the slowest request is named with its tries, the last the answer that recorded it (times from the run's start)
    slowest = re.fullmatch(r"POST /api/v1/\S+ sent at [\d.]+ s, (\d+) tries: (.*)", run.longest_wait)
    assert slowest, run.longest_wait
    outcomes = slowest[2].split(", ")
    assert int(slowest[1]) == len(outcomes) or (int(slowest[1]) > 6 and len(outcomes) == 7), run.longest_wait
    assert outcomes[-1].split()[0] in {"200", "201", "202"}, run.longest_wait


async def test_settling_waits_while_problems_get_fewer_and_reports_those_that_stay() -> None:
    """A backlog that drains slowly is waited out past the timeout; the wait ends ``timeout`` after the last
    progress, and a check that could not reach the system counts as no progress."""

    def checks(*counts: int) -> Callable[[], Awaitable[list[str]]]:
        script = iter(counts)

        async def check() -> list[str]:
            n = next(script, counts[-1])
            return [f"{NOT_ANSWERING} down"] if n < 0 else [f"problem {i}" for i in range(n)]

        return check

    started = time.monotonic()
    # one problem fewer every third check, 0.05 s apart: 1.5 s in all, past the timeout of 1 s, where a deadline
    # counted from the start would have reported the problems left then
    draining = [n for n in range(10, -1, -1) for _ in range(3)]
    assert await settled(checks(*draining), 1.0, recheck_s=0.05) == []
    assert time.monotonic() - started > 1.0
    assert await settled(checks(3, 2, -1), 1.0, recheck_s=0.05) == [f"{NOT_ANSWERING} down"]
    assert await settled(checks(3, 2, 2), 1.0, recheck_s=0.05) == ["problem 0", "problem 1"]
