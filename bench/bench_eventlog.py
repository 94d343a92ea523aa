"""Event log throughput on Postgres alone (no Ray): batched appends, concurrent single appends, folds.

Why: the log is on every path of the system, so its cost against what Postgres can do at all (raw
``executemany``) and against a mature library (``eventsourcing``'s Postgres recorders) on the same server
tells whether a slowdown elsewhere is the log's fault. Run from the repository root:

    python -m bench.bench_eventlog [--quick]
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from actors.entity import Context, Entity, EntityHost, Spawn
from actors.observability import tune_gc
from bench.common import (
    BenchTick,
    Row,
    at_least,
    db_url,
    embedded_postgres,
    fmt_rate,
    parser,
    percentile,
    print_table,
    quiet_logs,
    rate,
    ticks,
    with_machine_speed,
)
from events import ANY, NewEvent, RecordedEvent
from storage.eventlog import _COLUMNS, EventLog, _init_connection

WRITERS = 32


@dataclass(frozen=True)
class Sizes:
    batch_calls: int = 200
    batch_size: int = 100
    single_events: int = 20_000
    single_seconds: float = 10.0
    es_seconds: float = 5.0
    fold_events: int = 100_000
    fold_repeats: int = 2

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            batch_calls=40,
            single_events=3_000,
            single_seconds=3.0,
            es_seconds=2.0,
            fold_events=20_000,
            fold_repeats=2,
        )


# ---- a. batched appends against raw executemany --------------------------------------------------------


RAW_INSERT = "INSERT INTO raw_events (id, stream, version, type, data, meta) VALUES ($1, $2, $3, $4, $5, $6)"
RAW_TABLE = (
    "CREATE TABLE raw_events (id uuid NOT NULL, stream text NOT NULL, version bigint NOT NULL, "
    "type text NOT NULL, data jsonb NOT NULL, meta jsonb NOT NULL)"
)


async def agenthub_batched(log: EventLog, batches: list[list[NewEvent]], streams: int) -> float:
    t0 = time.perf_counter()
    for i, batch in enumerate(batches):
        await log.append(f"benchbatch-{i % streams}", batch, ANY)
    return time.perf_counter() - t0


async def raw_batched(conn: asyncpg.Connection, batches: list[list[tuple[Any, ...]]]) -> float:
    t0 = time.perf_counter()
    for rows in batches:
        await conn.executemany(RAW_INSERT, rows)
    return time.perf_counter() - t0


def raw_rows(batches: list[list[NewEvent]], streams: int) -> list[list[tuple[Any, ...]]]:
    """The same rows the log writes, fully prepared up front: the raw side pays only for the insert."""
    versions = [0] * streams
    out = []
    for i, batch in enumerate(batches):
        s = i % streams
        rows = []
        for e in batch:
            versions[s] += 1
            meta = e.meta.model_dump(mode="json", exclude_none=True)
            rows.append((e.id, f"benchraw-{s}", versions[s], e.type, e.data, meta))
        out.append(rows)
    return out


async def bench_batched(url: str, sizes: Sizes) -> list[Row]:
    streams = 20
    log = await EventLog.connect(url, max_size=2, run_migrations=False)
    conn = await asyncpg.connect(url)
    await _init_connection(conn)  # the same jsonb codec as the log: both sides pay for the JSON encoding
    await conn.execute(RAW_TABLE)
    n = sizes.batch_calls * sizes.batch_size
    try:
        # warm-up: prepared statements, first pages of the tables
        await agenthub_batched(log, [ticks(sizes.batch_size)], streams)
        await raw_batched(conn, raw_rows([ticks(sizes.batch_size)], streams))
        best_hub, best_raw = float("inf"), float("inf")
        for _ in range(2):  # interleaved rounds, best of each: less sensitive to a noisy neighbour
            batches = [ticks(sizes.batch_size, i * sizes.batch_size) for i in range(sizes.batch_calls)]
            best_hub = min(best_hub, await agenthub_batched(log, batches, streams))
            best_raw = min(best_raw, await raw_batched(conn, raw_rows(batches, streams)))
    finally:
        await conn.close()
        await log.close()
    hub_r, raw_r = rate(n, best_hub), rate(n, best_raw)
    ratio = hub_r / raw_r
    label = f"{sizes.batch_size}/call x {sizes.batch_calls}"
    return [
        Row(f"a. agenthub append, {label}", fmt_rate(hub_r)),
        Row(f"   raw asyncpg executemany, {label}", fmt_rate(raw_r)),
        Row("   agenthub / raw", f"{ratio:.0%}", ">= 40%", at_least(ratio, 0.40)),
    ]


# ---- b. single-event appends from 32 concurrent writers -----------------------------------------------


async def single_appends(
    log: EventLog, events: int, seconds: float, warmup_s: float = 1.0
) -> tuple[float, list[float]]:
    """32 writers, each appending one event at a time to its own stream; returns (seconds, latencies)."""
    remaining = events
    latencies: list[float] = []

    async def writer(w: int, deadline: float) -> None:
        nonlocal remaining
        stream = f"benchsingle-{w}"
        i = 0
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            i += 1
            t = time.perf_counter()
            await log.append(stream, [NewEvent.of(BenchTick(n=i, label="single", value=float(w)))], ANY)
            latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(writer(w, time.perf_counter() + warmup_s) for w in range(WRITERS)))
    remaining, latencies = events, []
    t0 = time.perf_counter()
    await asyncio.gather(*(writer(w, t0 + seconds) for w in range(WRITERS)))
    return time.perf_counter() - t0, latencies


async def bench_single_agenthub(url: str, sizes: Sizes) -> list[Row]:
    log = await EventLog.connect(url, min_size=WRITERS, max_size=WRITERS, run_migrations=False)
    try:
        elapsed, latencies = await single_appends(log, sizes.single_events, sizes.single_seconds)
    finally:
        await log.close()
    r = rate(len(latencies), elapsed)
    latencies.sort()
    p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
    return [
        Row(
            f"b. agenthub append, 1 event, {WRITERS} writers ({len(latencies):,} ev in {elapsed:.1f} s)",
            fmt_rate(r),
            ">= 3,000 ev/s",
            at_least(r, 3000),
        ),
        Row("   agenthub append latency p50 / p99", f"{p50:.1f} / {p99:.1f} ms"),
    ]


def eventsourcing_single(recorder: Any, total: int, seconds: float) -> tuple[int, float]:
    """The same workload through a sync recorder: 32 threads, each inserting one event per call."""
    from eventsourcing.persistence import StoredEvent

    lock = threading.Lock()
    remaining = total
    done = 0
    start = threading.Barrier(WRITERS + 1)

    def run(w: int) -> None:
        nonlocal remaining, done
        oid = uuid.uuid4()
        version = 0
        start.wait()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            with lock:
                if remaining <= 0:
                    break
                remaining -= 1
            version += 1
            state = json.dumps({"n": version, "label": "single", "value": float(w)}).encode()
            recorder.insert_events([StoredEvent(oid, version, "bench:Tick", state)])
            with lock:
                done += 1

    with ThreadPoolExecutor(WRITERS) as pool:
        futures = [pool.submit(run, w) for w in range(WRITERS)]
        start.wait()
        t0 = time.perf_counter()
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - t0
    return done, elapsed


def bench_single_eventsourcing(url: str, sizes: Sizes) -> list[Row]:
    from eventsourcing.postgres import (
        PostgresAggregateRecorder,
        PostgresApplicationRecorder,
        PostgresDatastore,
    )

    server = urlsplit(url)  # the embedded server's, password included
    datastore = PostgresDatastore(
        dbname=server.path.lstrip("/"),
        host=server.hostname,
        port=server.port,
        user=server.username,
        password=unquote(server.password or ""),
        pool_size=WRITERS,
        connect_timeout=30,
    )
    recorders: list[tuple[str, Callable[[], Any]]] = [
        ("ApplicationRecorder", lambda: PostgresApplicationRecorder(datastore, events_table_name="es_app")),
        ("AggregateRecorder", lambda: PostgresAggregateRecorder(datastore, events_table_name="es_agg")),
    ]
    rows = []
    try:
        for name, make in recorders:
            recorder = make()
            recorder.create_table()
            eventsourcing_single(recorder, 2_000, 1.0)  # warm-up: open the pool, prepare statements
            n, elapsed = eventsourcing_single(recorder, sizes.single_events, sizes.es_seconds)
            note = "global order, table lock" if name.startswith("App") else "no global order"
            rows.append(
                Row(f"   eventsourcing {name} ({note}; {n:,} ev in {elapsed:.1f} s)", fmt_rate(rate(n, elapsed)))
            )
    finally:
        datastore.close()
    return rows


# ---- c. folding a 100,000-event stream ------------------------------------------------------------------


@dataclass
class Totals:
    count: int = 0
    total: float = 0.0


class FoldEntity(Entity[Totals]):
    """The cheapest possible entity: activation cost is then all the host's and the log's."""

    category = "benchfold"

    def initial(self) -> Totals:
        return Totals()

    def evolve(self, state: Totals, event: RecordedEvent) -> Totals:
        state.count += 1
        state.total += event.data["value"]
        return state

    async def decide(self, state: Totals, message: RecordedEvent, ctx: Context) -> list[NewEvent | Spawn]:
        return []


async def read_near_head(log: EventLog, reads: int = 200) -> float:
    """Median time of ``read_committed`` a few events behind the head: what every subscriber pays per wake-up,
    which must not grow with the log (it once scanned the whole table: docs/architecture.md, "Speed")."""
    head = (await log.head_cursor()).cursor
    times = []
    for _ in range(reads):
        t = time.perf_counter()
        got = await log.read_committed((head[0], head[1] - 5))
        times.append(time.perf_counter() - t)
        if len(got.events) != 5:
            print(f"warning: the read near the head saw {len(got.events)} events", file=sys.stderr)
    return percentile(sorted(times), 50)


async def bench_fold(url: str, sizes: Sizes) -> list[Row]:
    log = await EventLog.connect(url, max_size=2, run_migrations=False)
    stream, n = "benchfold-1", sizes.fold_events
    try:
        t0 = time.perf_counter()
        for start in range(0, n, 1000):
            await log.append(stream, ticks(min(1000, n - start), start), ANY)
        append_s = time.perf_counter() - t0
        tail_s = await read_near_head(log)

        sql = f"SELECT {_COLUMNS} FROM events WHERE stream = $1 AND version >= $2 ORDER BY version LIMIT $3"
        fetch_s = read_s = load_s = nogc_s = float("inf")
        expected = sum(i * 0.5 for i in range(n))
        for _ in range(sizes.fold_repeats):
            async with log.connection() as c:  # the SQL + jsonb decode part alone, for the breakdown
                t = time.perf_counter()
                rows = await c.fetch(sql, stream, 1, None)
                fetch_s = min(fetch_s, time.perf_counter() - t)
            del rows

            t = time.perf_counter()
            state = Totals()
            for e in await log.read_stream(stream):
                state.count += 1
                state.total += e.data["value"]
            read_s = min(read_s, time.perf_counter() - t)
            if state.count != n or state.total != expected:
                print(f"warning: read_stream fold saw {state.count} events, sum {state.total}", file=sys.stderr)

            host = EntityHost(FoldEntity(), log)
            t = time.perf_counter()
            active = await host.load("1")
            load_s = min(load_s, time.perf_counter() - t)
            if active.state.count != n:
                print(f"warning: EntityHost.load folded {active.state.count} events", file=sys.stderr)
            del host, active

            gc.collect()
            gc.disable()  # diagnostic: how much of the fold is the cyclic GC scanning 100k new objects
            try:
                t = time.perf_counter()
                count = sum(1 for _ in await log.read_stream(stream))
                nogc_s = min(nogc_s, time.perf_counter() - t)
            finally:
                gc.enable()
            if count != n:
                print(f"warning: read_stream with gc paused saw {count} events", file=sys.stderr)
    finally:
        await log.close()
    r_read, r_load = rate(n, read_s), rate(n, load_s)
    return [
        Row(f"c. append {n:,} events to one stream, 1000/call", fmt_rate(rate(n, append_s))),
        Row(f"   a subscriber's read of the 5 newest events, {n:,} in the log: p50", f"{tail_s * 1000:.2f} ms"),
        Row(
            f"   read_stream + count/sum over {n:,} events ({read_s * 1000:,.0f} ms)",
            fmt_rate(r_read),
            ">= 100,000 ev/s",
            at_least(r_read, 100_000),
        ),
        Row(
            f"   EntityHost.load of the same stream ({load_s * 1000:,.0f} ms)",
            fmt_rate(r_load),
            ">= 100,000 ev/s",
            at_least(r_load, 100_000),
        ),
        Row(
            f"   of which SQL fetch + jsonb decode, asyncpg rows ({fetch_s * 1000:,.0f} ms)", fmt_rate(rate(n, fetch_s))
        ),
        Row(
            f"   diagnostic: read_stream with the cyclic GC paused ({nogc_s * 1000:,.0f} ms)", fmt_rate(rate(n, nogc_s))
        ),
    ]


# ---- main ------------------------------------------------------------------------------------------------


async def run(sizes: Sizes) -> list[Row]:
    with embedded_postgres() as pg:
        admin = await asyncpg.connect(pg.url)
        for name in ("bench_a", "bench_b", "bench_c", "es_bench"):
            await admin.execute(f"CREATE DATABASE {name}")
        await admin.close()
        dbs = ("bench_a", "bench_b", "bench_c")
        urls = {name: db_url(pg.url, name) for name in dbs}
        for url in urls.values():
            await (await EventLog.connect(url)).close()  # applies the migrations
        rows = await bench_batched(urls["bench_a"], sizes)
        rows += await bench_single_agenthub(urls["bench_b"], sizes)
        rows += await asyncio.to_thread(bench_single_eventsourcing, db_url(pg.url, "es_bench"), sizes)
        rows += await bench_fold(urls["bench_c"], sizes)
        return rows


def main() -> None:
    args = parser(__doc__).parse_args()
    quiet_logs()
    tune_gc()  # the GC settings every agenthub process runs with (actors/observability.py)
    sizes = Sizes.quick() if args.quick else Sizes()
    t0 = time.perf_counter()
    rows = with_machine_speed(lambda: asyncio.run(run(sizes)))
    print_table(f"agenthub event log on embedded Postgres ({time.perf_counter() - t0:.0f} s in all)", rows)


if __name__ == "__main__":
    main()
