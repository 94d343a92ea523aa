"""Projections of the agent hub (chat history, token usage, agent status) kept in Postgres tables.

A batch is applied in one transaction together with the projector's checkpoint, so each event is projected
exactly once even though delivery is at-least-once. ``rebuild`` empties the tables and the checkpoint; the
orchestrator then replays the whole log into them."""

from __future__ import annotations

import os
from typing import Any

import asyncpg
import ray
import structlog

from actors import metrics
from actors.config import RuntimeConfig
from actors.observability import configure_logging, export_metrics
from actors.statements import Statements
from actors.team_projection import TEAM_CATEGORIES, TEAM_TABLES, project_team
from events import NewEvent, RecordedEvent, Subscription
from events.system import ProjectionEventFailed
from storage.errors import translate_errors
from storage.eventlog import Cursor, EventLog

log = structlog.get_logger(__name__)

PROJECTOR = "projector"
TABLES = ("proj_agents", "proj_chat_messages", "proj_token_usage", *TEAM_TABLES)
SUBSCRIPTION = Subscription(name=PROJECTOR, categories=frozenset({"agent", "chat"}) | TEAM_CATEGORIES)


async def project(conn: Statements, e: RecordedEvent) -> None:
    d: dict[str, Any] = e.data
    t = e.type
    if t == "agent.created":
        await conn.execute(
            "INSERT INTO proj_agents (agent_id, name, settings, status, created_at, updated_at) "
            "VALUES ($1, $2, $3, 'stopped', $4, $4) ON CONFLICT (agent_id) DO UPDATE SET name = EXCLUDED.name, "
            "settings = EXCLUDED.settings, status = 'stopped', restarts = 0, last_error = NULL, "
            "created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at",
            d["agent_id"],
            d["name"],
            d["settings"],
            e.recorded_at,
        )
    elif t == "agent.updated":
        await conn.execute(
            "UPDATE proj_agents SET name = coalesce($2, name), settings = coalesce($3, settings), updated_at = $4 "
            "WHERE agent_id = $1",
            e.stream_id,
            d.get("name"),
            d.get("settings"),
            e.recorded_at,
        )
    elif t in ("agent.started", "agent.stopped", "agent.failed", "agent.deleted", "agent.restarted"):
        status = {
            "agent.started": "running",
            "agent.stopped": "stopped",
            "agent.failed": "error",
            "agent.deleted": "deleted",
        }.get(t)
        await conn.execute(
            # 'error' only for a running agent, as evolve_agent (actors/agents/agent.py)
            "UPDATE proj_agents SET status = CASE WHEN $2 = 'error' AND status <> 'running' THEN status "
            "ELSE coalesce($2, status) END, updated_at = $3, "
            "restarts = CASE WHEN $4::int IS NOT NULL THEN $4::int WHEN $2 = 'running' THEN 0 ELSE restarts END, "
            "last_error = CASE WHEN $2 = 'error' AND status = 'running' THEN $5 WHEN $2 = 'running' THEN NULL "
            "ELSE last_error END WHERE agent_id = $1",
            e.stream_id,
            status,
            e.recorded_at,
            d.get("attempt"),
            d.get("reason"),
        )
    elif t in ("chat.message_received", "chat.reply_sent"):
        user = t == "chat.message_received"
        await conn.execute(  # one statement for both sides, so a batch's chat rows go in one executemany
            "INSERT INTO proj_chat_messages VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            e.position,
            d["agent_id"],
            d["chat_id"],
            "user" if user else "assistant",
            d["text"] if user else d["response"],
            d.get("platform_user_id") if user else None,
            d["channel"],
            e.recorded_at,
        )
    elif t == "llm.completed":
        await conn.execute(
            "INSERT INTO proj_token_usage VALUES ($1, $2, $3, 1, $4, $5, $6, $7) "
            "ON CONFLICT (agent_id, provider, model) DO UPDATE SET calls = proj_token_usage.calls + 1, "
            "prompt_tokens = proj_token_usage.prompt_tokens + EXCLUDED.prompt_tokens, "
            "completion_tokens = proj_token_usage.completion_tokens + EXCLUDED.completion_tokens, "
            "total_tokens = proj_token_usage.total_tokens + EXCLUDED.total_tokens, "
            "cost_usd = proj_token_usage.cost_usd + EXCLUDED.cost_usd",
            d["agent_id"],
            d["provider"],
            d["model"],
            d["prompt_tokens"],
            d["completion_tokens"],
            d["total_tokens"],
            d["cost_usd"],
        )


# What an event's own content can cause in a projection: a value beyond a column's range, a constraint, a payload
# the code did not expect. Not the store's outages (StoreUnavailable) or a deadlock: those are retried.
UNAPPLIABLE = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    KeyError,
    TypeError,
    ValueError,
)
PARKED_STREAM = f"projection-{PROJECTOR}"


class ProjectorImpl:
    def __init__(self, config: RuntimeConfig) -> None:
        configure_logging()
        self.config = config
        self.projected = 0
        self.store: EventLog | None = None

    async def _store(self) -> EventLog:
        if self.store is None:
            self.store = await EventLog.connect(
                self.config.database_url.get_secret_value(), max_size=2, run_migrations=False
            )
        return self.store

    async def deliver(self, events: list[RecordedEvent], cursor: Cursor) -> Cursor:
        """Project ``events`` and move the checkpoint to ``cursor``, in one transaction. Events at or below the
        stored checkpoint are skipped: a delivery may come again (its commit's answer was lost, or the orchestrator
        rewound), and a second application would count token usage twice. The checkpoint row is locked first, so
        two deliveries (an old actor still finishing after a restart) cannot both apply one event.

        A batch that fails for an event's own content is projected again one event at a time, and each event that
        fails alone is parked: recorded as ``projection.event_failed`` in the same transaction, and skipped. It
        would otherwise fail every delivery from then on, the projector restarted again and again, every read
        model stuck behind it."""
        try:
            return await self._project(events, cursor)
        except UNAPPLIABLE as e:
            log.warning("a batch could not be projected: one event at a time", error=str(e))
            return await self._project(events, cursor, parking=True)

    async def _project(self, events: list[RecordedEvent], cursor: Cursor, parking: bool = False) -> Cursor:
        store = await self._store()
        parked: list[NewEvent] = []
        async with store.connection() as conn, conn.transaction():
            with translate_errors():
                if parking:  # before the first write, as an append in a caller's transaction needs
                    await store.lock_streams(conn, [PARKED_STREAM])
                stored = await self._lock_checkpoint(conn)
                fresh = [e for e in events if e.cursor > stored]
                if parking:
                    for e in fresh:
                        try:
                            async with conn.transaction():  # a savepoint: a failed event leaves nothing behind
                                await self._apply(conn, [e])
                        except UNAPPLIABLE as err:
                            parked.append(self._parked(e, err))
                    if parked:
                        await store.append(PARKED_STREAM, parked, conn=conn)
                else:
                    await self._apply(conn, fresh)
            if cursor > stored:
                await store.save_checkpoint(PROJECTOR, cursor, conn)
        for p in parked:
            log.error("event parked: the projection cannot apply it", **p.data)
        metrics.PARKED.labels(PROJECTOR).inc(len(parked))
        self.projected += len(fresh) - len(parked)
        metrics.ROUTED.labels(PROJECTOR).inc(len(fresh))
        return max(cursor, stored)

    @staticmethod
    async def _apply(conn: Any, events: list[RecordedEvent]) -> None:
        batch = Statements()
        for e in events:
            await project(batch, e)
            await project_team(batch, e)
        await batch.run(conn)

    @staticmethod
    def _parked(e: RecordedEvent, error: BaseException) -> NewEvent:
        why = f"{type(error).__name__}: {error}"[:1000]
        failed = ProjectionEventFailed(
            subscriber=PROJECTOR, event_id=str(e.id), position=e.position, stream=e.stream, type=e.type, error=why
        )
        return NewEvent.of(failed, causation_id=e.id, correlation_id=e.meta.correlation_id, actor=PROJECTOR)

    @staticmethod
    async def _lock_checkpoint(conn: Any) -> Cursor:
        """The stored checkpoint, its row locked until the transaction ends (created if missing, so there is a row
        to lock). One round trip: the no-op update takes the lock and returns the row as it is."""
        row = await conn.fetchrow(
            "INSERT INTO checkpoints AS c (subscriber, tx_id, position) VALUES ($1, '0'::xid8, 0) "
            "ON CONFLICT (subscriber) DO UPDATE SET tx_id = c.tx_id RETURNING c.tx_id, c.position",
            PROJECTOR,
        )
        return (int(row[0]), int(row[1]))

    async def rebuild(self) -> None:
        store = await self._store()
        async with store.connection() as conn, conn.transaction():
            await conn.execute(f"TRUNCATE {', '.join(TABLES)}")
            await conn.execute("DELETE FROM checkpoints WHERE subscriber = $1", PROJECTOR)
        self.projected = 0

    async def ping(self) -> dict[str, Any]:
        return {"subscriber": PROJECTOR, "pid": os.getpid(), "projected": self.projected}

    def metrics(self) -> bytes:
        return export_metrics()


Projector = ray.remote(num_cpus=0, max_restarts=-1)(ProjectorImpl)
