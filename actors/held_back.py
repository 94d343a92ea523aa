"""Who holds the log back: one open transaction that keeps committed events from every subscriber.

Subscribers read only below the oldest transaction still running (DESIGN's trap 1, storage/eventlog.py), so a
transaction left open (a session idle in a transaction, a long batch job, a forgotten prepared transaction, on any
database of the server) stops every delivery, and with it every reply, for as long as it stays open, while
the log itself accepts appends. That is the price of never skipping an event; this makes it visible instead of
silent. The orchestrator's reader tells the watch which transaction holds committed events back at each read;
the same one for ``warn_after_s`` is reported: a warning naming it (again every ``REPEAT_S`` while it lasts),
``agenthub_log_held_back_seconds``, the orchestrator's ping (and so ``/healthz``)."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import Gauge

log = structlog.get_logger(__name__)

REPEAT_S = 60.0  # how often a hold that lasts is reported again

Describe = Callable[[int], Awaitable[dict[str, Any] | None]]  # EventLog.describe_transaction


@functools.cache
def held_back_gauge() -> Gauge:
    """Made by the first watch of a process (the orchestrator's): made at import, it was also exported, at 0, by
    every process that imports this module (the ingress does)."""
    return Gauge(
        "agenthub_log_held_back_seconds",
        "How long one open transaction has held committed events back from every subscriber (0: nothing held back)",
    )


@dataclass
class Hold:
    tx: int  # the transaction (xid8)
    since: float  # monotonic: when a read first found it holding events back
    holder: dict[str, Any] | None = None  # what it is, once looked up
    reported_at: float | None = None


class HoldWatch:
    def __init__(self, warn_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.warn_after_s = warn_after_s
        self.clock = clock
        self.hold: Hold | None = None
        held_back_gauge().set_function(self.seconds)

    async def seen(self, held_by: int | None, describe: Describe) -> None:
        """Note a read's ``held_by``; report a hold that is due (looked up with ``describe``), and the end of one
        that was. A hold by another transaction starts over: many short ones in a row hold nothing back for long."""
        now = self.clock()
        h = self.hold
        if h is not None and h.tx != held_by:
            if h.reported_at is not None:
                log.info("committed events no longer held back", transaction=h.tx, held_s=round(now - h.since, 1))
            h = self.hold = None if held_by is None else Hold(held_by, now)
        elif h is None and held_by is not None:
            h = self.hold = Hold(held_by, now)
        if h is None or now - h.since < self.warn_after_s:
            return
        if h.reported_at is not None and now - h.reported_at < REPEAT_S:
            return
        h.reported_at = now
        try:
            h.holder = await describe(h.tx)
        except Exception as e:  # reported without the details rather than hold routing up
            h.holder = {"lookup_error": repr(e)[:200]}
        log.warning("an open transaction holds committed events back from every subscriber", **(self.report() or {}))

    def seconds(self) -> float:
        """How long the current hold has lasted (0 when nothing is held back)."""
        return 0.0 if self.hold is None else self.clock() - self.hold.since

    def report(self) -> dict[str, Any] | None:
        """The hold, once reported (it lasted ``warn_after_s``): its transaction, for how long, and what it is."""
        h = self.hold
        if h is None or h.reported_at is None:
            return None
        return {"transaction": h.tx, "for_s": round(self.seconds(), 1), **(h.holder or {})}


def hold_summary(report: dict[str, Any]) -> str:
    """One line for ``/healthz``: how long, and who (pid, application, state, query) as far as known."""
    who = [f"{k} {report[k]!r}" for k in ("pid", "prepared_gid", "application", "state", "query") if k in report]
    return (
        f"committed events held back for {report['for_s']:.0f} s by open transaction {report['transaction']}"
        + (f" ({', '.join(who)})" if who else "")
        + ": deliveries and replies wait until it ends"
    )
