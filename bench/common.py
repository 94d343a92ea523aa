"""What the benchmark scripts share: a private Postgres, bench-only event types and a results table.

The event types live here, not in the scripts, so that a script run as ``python -m bench.x`` (module
``__main__``) and the same module imported by name in a Ray worker register each type exactly once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import structlog

from cluster.ports import free_port
from events import NewEvent
from events.registry import EventData, event_type
from storage.embedded import EmbeddedPostgres

if TYPE_CHECKING:
    from cluster.bootstrap import System


@event_type("bench.tick")
class BenchTick(EventData):
    """A small payload with a few typed fields, like most domain events."""

    n: int
    label: str
    value: float


def ticks(n: int, start: int = 0) -> list[NewEvent]:
    return [NewEvent.of(BenchTick(n=i, label="tick", value=i * 0.5)) for i in range(start, start + n)]


@event_type("bench.ping")
class BenchPing(EventData):
    """An input message of the routing benchmark."""

    n: int


@event_type("bench.echo")
class BenchEcho(EventData):
    """The one event an actor appends per handled ``bench.ping``."""

    n: int


def machine_cpu_s() -> float:
    """CPU seconds used so far by every process on the machine (Postgres, Ray, the clients): the difference over
    a run, divided by what it did, is what one unit of work costs the whole system."""
    return sum(cpu_by_process().values())


# Which process a command line belongs to, first match wins; everything else is "other".
PROCESS_GROUPS = (
    ("ingress replica", "ServeReplica"),
    ("agent runners", "AgentRunner"),
    ("orchestrator", "Orchestrator"),
    ("projector", "Projector"),
    ("Postgres", "postgres"),
    ("HAProxy", "haproxy"),
    ("Ray and Serve's own processes", "ray"),
)


def cpu_by_process() -> dict[str, float]:
    """CPU seconds used so far, summed by ``PROCESS_GROUPS`` ("this process": the benchmark and its clients)."""
    me = os.getpid()
    out: dict[str, float] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            cmd = " ".join(p.info["cmdline"] or [])
            group = "this process" if p.info["pid"] == me else next((g for g, k in PROCESS_GROUPS if k in cmd), "other")
            out[group] = out.get(group, 0.0) + t.user + t.system
    return out


def quiet_logs() -> None:
    """Only warnings and errors from structlog, so the table is not drowned in info lines."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(description or "").strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    return p


@contextlib.contextmanager
def embedded_postgres() -> Iterator[EmbeddedPostgres]:
    """A throwaway server in a temp dir on a free port, stopped (and deleted) at the end."""
    with tempfile.TemporaryDirectory(prefix="agenthub-bench-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pg", free_port())
        pg.start()
        try:
            yield pg
        finally:
            pg.stop("fast")


def db_url(server_url: str, dbname: str) -> str:
    return server_url.rsplit("/", 1)[0] + f"/{dbname}"


@dataclass
class Row:
    name: str
    measured: str
    target: str = ""
    verdict: str = ""


def at_least(value: float, target: float) -> str:
    return "ok" if value >= target else "below target"


def at_most(value: float, target: float) -> str:
    return "ok" if value <= target else "below target"


def rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def fmt_rate(r: float, unit: str = "ev/s") -> str:
    return f"{r:,.0f} {unit}"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


@dataclass(frozen=True)
class MachineSpeed:
    """This machine's speed at one moment, so that a run's figures can be read against other days'. It has moved
    by half from one day to the next (docs/benchmarks.md), and not evenly: the route that does nothing was as fast
    as ever on a day when every process of the message path, which wakes a process on the other core at every
    hop, took half as much CPU again per message."""

    round_trip_us: float  # a byte to a process on the other core and back, over pipes: two wake-ups
    round_trip_cpu_us: float  # CPU of both ends per round trip: what the wake-ups cost, not how long they wait
    python_loop_ms: float  # a fixed pure-Python loop: the interpreter's speed, wake-ups apart
    memory_step_ns: float  # a step of a random walk over far more memory than the caches hold

    def rows(self, when: str) -> list[Row]:
        return [
            Row(
                f"this machine {when}: a pipe round trip to a process on the other core (CPU of both ends)",
                f"{self.round_trip_us:.0f} us ({self.round_trip_cpu_us:.0f} us)",
            ),
            Row(f"   {PYTHON_LOOP:,} multiply-adds in a Python loop", f"{self.python_loop_ms:.0f} ms"),
            Row(f"   a step of a random walk over a list of {WALK_SLOTS:,} numbers", f"{self.memory_step_ns:.0f} ns"),
        ]


PYTHON_LOOP = 3_000_000
WALK_SLOTS = 1 << 20  # with their number objects, ~40 MB, read in no order: mostly cache and TLB misses
_ECHO = "import os\nwhile os.read(0, 1):\n    os.write(1, b'x')"


def machine_speed(round_trips: int = 20_000) -> MachineSpeed:
    """Measure ``MachineSpeed`` (about three seconds here). The echoing child is a fresh interpreter, not a fork, so a
    process that runs Ray's threads can call this."""
    cores = sorted(os.sched_getaffinity(0))
    child = subprocess.Popen([sys.executable, "-c", _ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert child.stdin is not None and child.stdout is not None
    w, r = child.stdin.fileno(), child.stdout.fileno()
    os.write(w, b"x")
    os.read(r, 1)  # the child is up
    echo = psutil.Process(child.pid)
    # On two cores, as the message path's processes mostly are: left to the scheduler, the two ends sometimes
    # share one core, and a round trip then takes a tenth as long.
    os.sched_setaffinity(0, cores[:1])
    os.sched_setaffinity(child.pid, cores[-1:])
    try:
        t, cpu, theirs = time.perf_counter(), time.process_time(), sum(echo.cpu_times()[:2])
        for _ in range(round_trips):
            os.write(w, b"x")
            os.read(r, 1)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu + sum(echo.cpu_times()[:2]) - theirs
    finally:
        os.sched_setaffinity(0, cores)
        child.stdin.close()
        child.wait()
    t, s = time.perf_counter(), 0
    for i in range(PYTHON_LOOP):
        s += i * i
    loop_ms = (time.perf_counter() - t) * 1000
    order = list(range(WALK_SLOTS))
    random.Random(0).shuffle(order)
    after = [0] * WALK_SLOTS  # one cycle through every slot
    for here, there in zip(order, order[1:] + order[:1], strict=True):
        after[here] = there
    k, steps = 0, WALK_SLOTS
    t = time.perf_counter()
    for _ in range(steps):
        k = after[k]
    step_ns = (time.perf_counter() - t) / steps * 1e9
    return MachineSpeed(wall / round_trips * 1e6, cpu / round_trips * 1e6, loop_ms, step_ns)


def with_machine_speed(run: Callable[[], list[Row]]) -> list[Row]:
    """``run()``'s rows, then the machine's speed measured just before and just after it (``MachineSpeed``)."""
    before = machine_speed()
    rows = run()
    return rows + before.rows("before the run") + machine_speed().rows("after it")


def print_table(title: str, rows: list[Row]) -> None:
    headers = ("figure", "measured", "target", "verdict")
    cols = [[r.name, r.measured, r.target, r.verdict] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cols)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    print(line)
    for c in cols:
        cells = [v.rjust(w) if i == 1 else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths, strict=True))]
        print("  ".join(cells).rstrip())
    print(line, flush=True)


@contextlib.contextmanager
def running_system(api_token: str) -> Iterator[tuple[System, float]]:
    """The whole system on a private data dir and Postgres, on free ports (HTTP on 8100); yields it with the
    seconds it took to start, and takes it down at the end."""
    from cluster.bootstrap import down, up
    from cluster.cli import exit_by_signal
    from cluster.settings import Settings

    for var in ("DATABASE_URL", "AGENTHUB_DATABASE_URL"):  # always a private, throwaway database
        os.environ.pop(var, None)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agenthub-bench-") as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            pg_port=free_port(),
            http_port=8100,
            dashboard_port=free_port(),
            num_cpus=2,
            ray_address=None,
            api_token=api_token,
        )
        system = up(settings)
        # After Ray's start, which puts its own handler on SIGTERM: a benchmark stopped by `timeout` or CI takes
        # its system down as on Ctrl-C, instead of dying at once and leaving Postgres and HAProxy running.
        signal.signal(signal.SIGTERM, exit_by_signal)
        try:
            yield system, time.perf_counter() - t0
        finally:
            down(system)
