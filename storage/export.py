"""Export the log to Parquet with pyarrow, page by page (the log may be larger than memory)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.eventlog import EventLog

SCHEMA = pa.schema(
    [
        ("position", pa.int64()),
        ("stream", pa.string()),
        ("version", pa.int64()),
        ("type", pa.string()),
        ("id", pa.string()),
        ("data", pa.string()),
        ("meta", pa.string()),
        ("recorded_at", pa.timestamp("us", tz="UTC")),
    ]
)


async def export_parquet(
    store: EventLog,
    out: Path,
    from_position: int = 0,
    page: int = 10_000,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write to ``out`` the events after ``from_position``; returns how many were written.

    Events are written in commit order ``(tx_id, position)``, as subscribers read them, and only from transactions
    that can no longer be overtaken (``EventLog.read_committed``): an event is written once every event before it
    in that order is committed. Paging by ``position > last`` instead would write a later event and then, on the
    next incremental run, miss forever an event with a lower position that a slow transaction committed late.

    ``from_position`` resumes after the event at that position in commit order (``EventLog.cursor_at``). Passing
    the position of the last row of the previous export resumes exactly where it ended: nothing missed, nothing
    written twice. Passing any other position that export wrote misses nothing either, but may write again events
    that followed it in commit order. A file is therefore ordered by commit, not by position (sort by the
    ``position`` column for position order). An event held back by a transaction still running when the export
    ran is left for the next run.

    The file is written beside ``out`` and renamed onto it once whole: ``ParquetWriter`` truncates its file at once
    and closes it with a valid footer even on an error, so a failed run would have replaced the previous export
    with a well-formed part of this one."""
    part = out.with_name(out.name + ".part")
    try:
        written = await _write(store, part, from_position, page, progress)
        os.replace(part, out)
    except BaseException:  # KeyboardInterrupt and cancellation too: the previous file stays, the part goes
        part.unlink(missing_ok=True)
        raise
    return written


async def _write(
    store: EventLog, out: Path, from_position: int, page: int, progress: Callable[[int], None] | None
) -> int:
    written = 0
    cursor = await store.cursor_at(from_position)
    with pq.ParquetWriter(out, SCHEMA, compression="zstd") as writer:
        async for batch in store.committed_pages(cursor, limit=page):
            if not batch:
                continue
            cols = {
                "position": [e.position for e in batch],
                "stream": [e.stream for e in batch],
                "version": [e.version for e in batch],
                "type": [e.type for e in batch],
                "id": [str(e.id) for e in batch],
                "data": [json.dumps(e.data) for e in batch],
                "meta": [e.meta.model_dump_json(exclude_none=True) for e in batch],
                "recorded_at": [e.recorded_at for e in batch],
            }
            writer.write_table(pa.table(cols, schema=SCHEMA))
            written += len(batch)
            if progress:
                progress(len(batch))
    return written
