"""Export the log to Parquet with pyarrow, page by page (the log may be larger than memory)."""

from __future__ import annotations

import json
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
    """Write events after ``from_position`` to ``out``; returns how many were written."""
    written = 0
    pos = from_position
    with pq.ParquetWriter(out, SCHEMA, compression="zstd") as writer:
        while batch := await store.read_all(pos, limit=page):
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
            pos = batch[-1].position
            if progress:
                progress(len(batch))
    return written
