"""Log → actor routing throughput: the orchestrator tails the log, a Ray actor appends one event per message.

Why: every reaction in the system (an agent's reply, a timer, a projection) goes through this path, so its
rate bounds what one subscriber can do. The inputs are committed in one transaction, so the clock starts
when they all become visible at once and stops when the last echo exists. Run from the repository root
(not while another Ray job is using this machine):

    python -m bench.bench_routing [--quick]
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from actors.entity import Context, Entity, EntityHost, Spawn
from actors.subscriber import EntityActor
from bench.common import (
    BenchEcho,
    BenchPing,
    Row,
    at_least,
    fmt_rate,
    parser,
    print_table,
    quiet_logs,
    rate,
    running_system,
    with_machine_speed,
)
from events import ANY, NewEvent, RecordedEvent, Subscription
from storage.eventlog import EventLog

if TYPE_CHECKING:  # the actor's process imports this module: keep Serve and the bootstrap out of it
    from cluster.bootstrap import System
    from cluster.settings import Settings

CATEGORY = "benchecho"
SUBSCRIBER = "bench-echo"
WARM_PREFIX = "warm"


class Echo(Entity[int]):
    """Appends exactly one ``bench.echo`` per ``bench.ping``; a redelivered ping repeats nothing."""

    category = CATEGORY

    def initial(self) -> int:
        return 0

    def evolve(self, state: int, event: RecordedEvent) -> int:
        return state + 1 if event.type == "bench.echo" else state

    async def decide(self, state: int, message: RecordedEvent, ctx: Context) -> list[NewEvent | Spawn]:
        if message.type != "bench.ping" or ctx.effects_of(message):
            return []
        return [NewEvent.of(BenchEcho(n=message.data["n"]))]


class BenchEchoActorImpl(EntityActor):
    """The subscriber: the real actor base and entity host, with the trivial entity above."""

    async def setup(self) -> None:
        max_active = self.config.max_active_entities
        self.hosts[CATEGORY] = EntityHost(Echo(), self.store, max_active=max_active, snapshot_every=0)


BenchEchoActor = ray.remote(num_cpus=0)(BenchEchoActorImpl)
ACTOR = "bench.bench_routing:BenchEchoActor"
"""What the orchestrator imports (``module:Class``) and builds as ``BenchEchoActor(config, *args)``."""


@dataclass(frozen=True)
class Sizes:
    events: int = 10_000
    streams: int = 100
    timeout_s: float = 120.0

    @classmethod
    def quick(cls) -> Sizes:
        return cls(events=2_000, streams=50, timeout_s=60.0)


async def append_pings(log: EventLog, prefix: str, streams: int, per_stream: int) -> None:
    """All pings in one transaction: none is visible to the orchestrator before all are."""
    names = [f"{CATEGORY}-{prefix}{s}" for s in range(streams)]
    async with log.connection() as conn, conn.transaction():
        await log.lock_streams(conn, names)  # one transaction writes them all (EventLog.append, ``conn``)
        for s, name in enumerate(names):
            pings = [NewEvent.of(BenchPing(n=s * per_stream + i)) for i in range(per_stream)]
            await log.append(name, pings, ANY, conn=conn)


async def echoes(log: EventLog, prefix: str) -> int:
    async with log.connection() as conn:
        n = await conn.fetchval(
            "SELECT count(*) FROM events WHERE type = 'bench.echo' AND stream LIKE $1",
            f"{CATEGORY}-{prefix}%",
        )
    return int(n)


async def wait_for(log: EventLog, prefix: str, n: int, timeout: float) -> tuple[int, float]:
    """Poll until ``n`` echoes exist in the streams of ``prefix``; returns (count, seconds)."""
    t0 = time.perf_counter()
    count = 0
    while time.perf_counter() - t0 < timeout:
        count = await echoes(log, prefix)
        if count >= n:
            break
        await asyncio.sleep(0.02)
    return count, time.perf_counter() - t0


async def measure(system: System, settings: Settings, sizes: Sizes) -> list[Row]:
    subscription = Subscription(name=SUBSCRIBER, types=frozenset({"bench.ping"}), categories=frozenset({CATEGORY}))
    orchestrator: Any = system.orchestrator
    await orchestrator.register.remote(subscription, ACTOR, [SUBSCRIBER])
    log = await EventLog.connect(system.database_url, max_size=4, run_migrations=False)
    try:
        # warm-up: the actor starts, connects its pool and prepares its statements
        warm = 10
        await append_pings(log, WARM_PREFIX, warm, 5)
        got, warm_s = await wait_for(log, WARM_PREFIX, warm * 5, 120)
        if got < warm * 5:
            raise RuntimeError(f"warm-up: {got} of {warm * 5} echoes after {warm_s:.0f} s; is the actor up?")

        per_stream = sizes.events // sizes.streams
        n = per_stream * sizes.streams
        t = time.perf_counter()
        await append_pings(log, "s", sizes.streams, per_stream)
        append_s = time.perf_counter() - t
        count, elapsed = await wait_for(log, "s", n, sizes.timeout_s)
    finally:
        await log.close()

    actor = ray.get_actor(SUBSCRIBER, namespace=settings.ray_namespace)
    stats: dict[str, Any] = await actor.ping.remote()
    r = rate(count, elapsed)
    done = f"{count:,} of {n:,}" + ("" if count >= n else f", TIMED OUT after {elapsed:.0f} s")
    return [
        Row(
            f"routing: {n:,} pings over {sizes.streams} streams -> echoes ({done})",
            fmt_rate(r),
            ">= 2,000 ev/s",
            at_least(r, 2000) if count >= n else "below target",
        ),
        Row("   commit of the inputs -> last echo recorded", f"{elapsed:.2f} s"),
        Row(f"   inputs appended, one transaction ({append_s * 1000:,.0f} ms)", fmt_rate(rate(n, append_s))),
        Row(
            "   actor: handled / activations / failures",
            f"{stats['handled']:,} / {stats['activations']:,} / {stats['failures']:,}",
        ),
        Row("   warm-up (actor start + 50 echoes)", f"{warm_s:.2f} s"),
    ]


def main() -> None:
    args = parser(__doc__).parse_args()
    quiet_logs()
    sizes = Sizes.quick() if args.quick else Sizes()
    t0 = time.perf_counter()

    def run() -> list[Row]:
        with running_system("bench-token") as (system, started_s):
            rows = asyncio.run(measure(system, system.settings, sizes))
        return [*rows, Row("   system start (Postgres, Ray, orchestrator, Serve)", f"{started_s:.1f} s")]

    rows = with_machine_speed(run)
    print_table(f"log -> actor routing, one append per event ({time.perf_counter() - t0:.0f} s in all)", rows)


if __name__ == "__main__":
    main()
