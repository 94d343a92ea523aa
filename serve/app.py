"""The HTTP API (FastAPI), served by Ray Serve (serve/deployment.py) or any ASGI server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated, Any

import asyncpg
import structlog
from fastapi import APIRouter, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.agents.agent import AgentState, agent_stream
from actors.agents.conversation import chat_stream
from actors.held_back import hold_summary
from events import ANY, NO_STREAM, Meta, NewEvent, RecordedEvent, UnknownEventType
from events.envelope import validate_stream
from events.hub import (
    AgentCreated,
    AgentDeleted,
    AgentSettings,
    AgentStarted,
    AgentStopped,
    AgentUpdated,
    MessageReceived,
    settings_block,
)
from events.registry import registry
from serve.deps import BearerAuth, HubDep, ReadModelsDep, document_bearer, state
from serve.fast_route import KEY_MAX, TIMEOUT_MAX_S, PlainRequestRoute
from serve.hub import Hub, OrchestratorUnavailable
from serve.metrics import merge_expositions
from serve.request_metrics import RequestMetrics
from serve.schemas import (
    INT64_MAX,
    Accepted,
    AgentCreate,
    AgentOut,
    AgentPatch,
    AppendIn,
    AppendOut,
    MessageIn,
    MessageOut,
    storable,
)
from serve.team_routes import build_router
from storage.errors import EventTooLarge, InvalidEvent, StoreUnavailable, WrongExpectedVersion
from storage.eventlog import AfterPosition, Cursor, Head

STREAM_NAME_MAX = 200  # events/envelope.py STREAM_RE: a stream's id (after the category's dash) has 1-200 characters
log = structlog.get_logger(__name__)
XID8_MAX = 2**64 - 1
STATUS_TIMEOUT_S = 10.0

app = FastAPI(title="agenthub", version="0.1.0")


# ---- errors: JSON {"detail": ...} with the right status ------------------------------------------------


@app.exception_handler(StoreUnavailable)
async def _unavailable(request: Request, e: StoreUnavailable) -> JSONResponse:
    log.warning("request failed: event store unavailable", path=request.url.path, error=str(e))
    detail = e.public
    if request.method not in ("GET", "HEAD"):
        # The connection may have dropped while a commit was in flight: whether a write went through is unknown.
        detail += (
            "; the outcome is unknown: a write may or may not have been recorded. Retry later with the same "
            "Idempotency-Key (or idempotency_key) so that it is applied at most once"
        )
    return JSONResponse({"detail": detail}, 503, headers={"Retry-After": "1"})


@app.exception_handler(OrchestratorUnavailable)
async def _no_orchestrator(_: Request, e: OrchestratorUnavailable) -> JSONResponse:
    return JSONResponse({"detail": str(e)}, 503, headers={"Retry-After": "1"})


@app.exception_handler(WrongExpectedVersion)
async def _conflict(_: Request, e: WrongExpectedVersion) -> JSONResponse:
    return JSONResponse({"detail": str(e), "actual_version": e.actual}, 409)


@app.exception_handler(EventTooLarge)
async def _too_large(_: Request, e: EventTooLarge) -> JSONResponse:
    return JSONResponse({"detail": str(e)}, 413)


@app.exception_handler(InvalidEvent)
async def _invalid_event(_: Request, e: InvalidEvent) -> JSONResponse:
    return JSONResponse({"detail": str(e)}, 422)


@app.exception_handler(UnknownEventType)
async def _unknown_type(_: Request, e: UnknownEventType) -> JSONResponse:
    return JSONResponse({"detail": str(e)}, 422)


@app.exception_handler(ValidationError)
async def _invalid(_: Request, e: ValidationError) -> JSONResponse:
    return JSONResponse({"detail": json.loads(e.json(include_url=False))}, 422)


@app.exception_handler(asyncpg.PostgresError)
async def _pg(_: Request, e: asyncpg.PostgresError) -> JSONResponse:
    if isinstance(e, asyncpg.DataError):  # SQLSTATE class 22: the input cannot be stored (a NUL character, ...)
        return JSONResponse({"detail": f"invalid input: {e}"}, 422)
    return JSONResponse({"detail": f"database error: {type(e).__name__}"}, 500)


@app.exception_handler(Exception)
async def _internal(_: Request, e: Exception) -> JSONResponse:
    """Anything unforeseen is still JSON (Starlette's default is a plain-text page); the server logs the trace."""
    return JSONResponse({"detail": f"internal error: {type(e).__name__}"}, 500)


class BodyLimit:
    """413 for a body over the limit, before it is parsed: at once from ``Content-Length``; a chunked body is
    read here first (bounded) and handed on whole. Pure ASGI, because ``BaseHTTPMiddleware`` costs a task and a
    stream copy on every request. Starlette's own limiter answers in plain text, and FastAPI's (``max_body_size``,
    0.165+) answers a fixed "Content Too Large" and takes its limit when the app is built; this one names the
    limit and reads it from the deployment's settings."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = state.max_body_bytes
        too_large = partial(JSONResponse, {"detail": f"request body over the {limit}-byte limit"}, 413)
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await too_large()(scope, receive, send)
        if length is not None or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await too_large()(scope, receive, send)
        whole: Message = {"type": "http.request", "body": bytes(body), "more_body": False}
        handed = False

        async def replay() -> Message:
            nonlocal handed
            if handed:
                return await receive()
            handed = True
            return whole

        await self.app(scope, replay, send)


app.add_middleware(BodyLimit)
app.add_middleware(BearerAuth)  # outside the body limit: an anonymous client's body is never read
app.add_middleware(RequestMetrics)  # added last: outermost, so it counts the body limit's 413s too


# ---- health and metrics -------------------------------------------------------------------------------


@app.get("/healthz")
async def healthz(h: HubDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        await h.store.fetchval("SELECT 1")
        checks["database"] = "ok"
    except StoreUnavailable as e:
        checks["database"] = e.public
    try:
        pong = await asyncio.wait_for(h.orchestrator.ping.remote(), 2)
        checks["orchestrator"] = "ok"
        checks["delivery"] = "ok" if pong.get("held_back") is None else hold_summary(pong["held_back"])
    except Exception as e:
        checks["orchestrator"] = f"unavailable: {type(e).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "degraded", "checks": checks}, 200 if ok else 503)


@app.get("/metrics")
async def prometheus(h: HubDep) -> PlainTextResponse:
    pages = await h.actor_metrics()
    return PlainTextResponse(merge_expositions(pages), media_type="text/plain; version=0.0.4")


# ---- messages -----------------------------------------------------------------------------------------
# The API's busiest route, before the other API routes: Starlette, and Serve to name a request's route for its
# metrics, try the routes in order. Fourteenth, it cost 8 + 14 us a message; seventh, 3 + 7 us.


messages = APIRouter(route_class=PlainRequestRoute)  # ordinary requests skip FastAPI's parameter solving


@messages.post(
    "/api/v1/agents/{agent_id}/messages",
    response_model=MessageOut,
    responses={202: {"model": Accepted, "description": "recorded; the reply will arrive in the log"}},
)
async def send_message(
    agent_id: str,
    body: MessageIn,
    h: HubDep,
    idempotency_key: Annotated[str | None, Header(max_length=KEY_MAX)] = None,
    timeout: Annotated[float | None, Query(gt=0, le=TIMEOUT_MAX_S)] = None,
) -> Response:
    """Append the message, then wait for the reply it causes (202 on timeout). Both answers are
    written here (pydantic-core's JSON), which spares FastAPI's encoding of the model on the API's busiest route."""
    state = await load_agent(h, agent_id, cached=True)
    if state.status != "running":
        raise HTTPException(409, f"agent {agent_id!r} is {state.status}; start it first")
    stream = chat_stream(agent_id, body.chat_id)
    try:
        validate_stream(stream)
    except ValueError as e:
        most = STREAM_NAME_MAX - len(agent_id) - 1  # the stream is chat-<agent>/<chat>
        why = f"at most {most} characters for agent {agent_id!r}" if len(body.chat_id) > most else str(e)
        raise HTTPException(422, f"chat_id cannot name a chat: {why}") from None
    event = NewEvent.of(MessageReceived(agent_id=agent_id, **body.model_dump()), actor="api")
    event.meta.correlation_id = event.id
    key = f"msg:{agent_id}:{idempotency_key}" if idempotency_key else None
    message_id = event.id
    fut = await h.waiter.expect(str(message_id))
    recorded: RecordedEvent | None = None
    try:
        res = await h.store.append(stream, [event], ANY, idempotency_key=key)
        if res.replayed:  # a retried request: answer with the original message's reply
            h.waiter.forget(str(message_id), fut)
            original = await h.original_of(res.positions[0])
            if original.type != event.type or original.data != event.data:
                raise HTTPException(
                    422,
                    f"Idempotency-Key {idempotency_key!r} was already used for a different message (event "
                    f"{original.id} in {original.stream}); use a new key for a new message",
                )
            message_id = original.id
            fut = await h.waiter.expect(str(message_id))  # before looking, so a reply committed meanwhile reaches it
            recorded = await h.find_reply(original)
        reply = recorded if recorded is not None else await asyncio.wait_for(fut, timeout or h.reply_timeout_s)
    except TimeoutError:
        accepted = Accepted(
            event_id=message_id, correlation_id=message_id, detail="message recorded; the reply will arrive in the log"
        )
        return Response(accepted.model_dump_json(), 202, media_type="application/json")
    finally:
        h.waiter.forget(str(message_id), fut)  # a no-op once the follower has resolved it
    if reply.type == "chat.reply_failed":  # 402: the agent's budget is spent (raise it with PATCH settings)
        status = 402 if reply.data.get("budget_exceeded") else 502
        raise HTTPException(status, f"agent failed to reply: {reply.data['error']}")
    out = MessageOut(
        chat_id=reply.data["chat_id"],
        response=reply.data["response"],
        channel=reply.data["channel"],
        event_id=message_id,
        reply_event_id=reply.id,
    )
    return Response(out.model_dump_json(), media_type="application/json")


app.include_router(messages)


# ---- agents -------------------------------------------------------------------------------------------


async def load_agent(h: Hub, agent_id: str, *, cached: bool = False) -> AgentState:
    state = await h.agent(agent_id, cached=cached)
    if not state.exists:
        raise HTTPException(404, f"unknown agent {agent_id!r}")
    return state


async def agent_out(h: Hub, s: AgentState) -> AgentOut:
    hb = await h.store.fetchval("SELECT at FROM agent_heartbeats WHERE agent_id = $1", s.agent_id)
    return AgentOut(
        id=s.agent_id,
        name=s.name,
        settings=s.settings,
        status=s.status,
        restarts=s.restarts,
        version=s.version,
        last_error=s.last_error,
        last_heartbeat=hb,
        created_at=s.created_at,
        updated_at=s.updated_at,
    )


async def change_agent(h: Hub, agent_id: str, event: NewEvent, state: AgentState) -> AgentOut:
    event.meta.actor = "api"
    try:
        await h.store.append(agent_stream(agent_id), [event], state.version)
    finally:  # also when the outcome is unknown (503): the change may have been recorded
        h.forget_agent(agent_id)
    return await agent_out(h, await load_agent(h, agent_id) if event.type != "agent.deleted" else state)


@app.post("/api/v1/agents", status_code=201)
async def create_agent(body: AgentCreate, h: HubDep) -> AgentOut:
    agent_id = body.id or h.new_agent_id()
    existing = await h.agent(agent_id)
    if existing.exists:
        raise HTTPException(409, f"agent {agent_id!r} already exists")
    if existing.status == "deleted":  # its chats, spending and runner's place stay with the id: a new agent
        # under it would answer with the old one's history in its prompts, within the old one's budget
        raise HTTPException(409, f"agent id {agent_id!r} belonged to an agent that was deleted; choose another id")
    settings = await h.secrets.mask_settings(agent_id, body.settings)
    event = NewEvent.of(AgentCreated(agent_id=agent_id, name=body.name, settings=settings), actor="api")
    await h.store.append(agent_stream(agent_id), [event], existing.version if existing.version else NO_STREAM)
    return await agent_out(h, await load_agent(h, agent_id))


@app.get("/api/v1/agents")
async def list_agents(h: ReadModelsDep, status: str | None = None) -> list[dict[str, Any]]:
    rows = await h.store.fetch(
        "SELECT a.*, hb.at AS last_heartbeat FROM proj_agents a LEFT JOIN agent_heartbeats hb USING (agent_id) "
        "WHERE a.status <> 'deleted' AND ($1::text IS NULL OR a.status = $1) ORDER BY a.created_at",
        status,
    )
    return [
        {
            "id": r["agent_id"],
            "name": r["name"],
            "settings": r["settings"],
            "status": r["status"],
            "restarts": r["restarts"],
            "last_error": r["last_error"],
            "last_heartbeat": r["last_heartbeat"],
            "created_at": r["created_at"],
            "updated_at": r["updated_at"],
        }
        for r in rows
    ]


@app.get("/api/v1/agents/{agent_id}")
async def get_agent(agent_id: str, h: HubDep) -> AgentOut:
    return await agent_out(h, await load_agent(h, agent_id))


@app.patch("/api/v1/agents/{agent_id}")
async def patch_agent(agent_id: str, body: AgentPatch, h: HubDep) -> AgentOut:
    state = await load_agent(h, agent_id)
    settings = None
    if body.settings is not None:
        merged = AgentSettings.model_validate({**state.settings.model_dump(), **settings_block(body.settings)})
        settings = await h.secrets.mask_settings(agent_id, merged)
    return await change_agent(h, agent_id, NewEvent.of(AgentUpdated(name=body.name, settings=settings)), state)


@app.delete("/api/v1/agents/{agent_id}", status_code=204)
async def delete_agent(agent_id: str, h: HubDep) -> Response:
    state = await load_agent(h, agent_id)
    await change_agent(h, agent_id, NewEvent.of(AgentDeleted()), state)
    return Response(status_code=204)


@app.post("/api/v1/agents/{agent_id}/start")
async def start_agent(agent_id: str, h: HubDep) -> AgentOut:
    state = await load_agent(h, agent_id)
    if state.status == "running":
        return await agent_out(h, state)
    return await change_agent(h, agent_id, NewEvent.of(AgentStarted()), state)


@app.post("/api/v1/agents/{agent_id}/stop")
async def stop_agent(agent_id: str, h: HubDep) -> AgentOut:
    state = await load_agent(h, agent_id)
    if state.status != "running":
        return await agent_out(h, state)
    return await change_agent(h, agent_id, NewEvent.of(AgentStopped()), state)


@app.get("/api/v1/agents/{agent_id}/chats/{chat_id:path}/messages")
async def chat_history(
    agent_id: str, chat_id: str, h: ReadModelsDep, limit: int = Query(100, ge=1, le=1000)
) -> list[dict]:
    await load_agent(h, agent_id)
    rows = await h.store.fetch(
        "SELECT position, role, text, platform_user_id, channel, at FROM proj_chat_messages "
        "WHERE agent_id = $1 AND chat_id = $2 ORDER BY position DESC LIMIT $3",
        agent_id,
        chat_id,
        limit,
    )
    return [dict(r) for r in reversed(rows)]


@app.get("/api/v1/agents/{agent_id}/usage")
async def token_usage(agent_id: str, h: ReadModelsDep) -> dict[str, Any]:
    await load_agent(h, agent_id)
    rows = await h.store.fetch(
        "SELECT provider, model, calls, prompt_tokens, completion_tokens, total_tokens, cost_usd "
        "FROM proj_token_usage WHERE agent_id = $1 ORDER BY provider, model",
        agent_id,
    )
    models = [dict(r) for r in rows]
    return {
        "agent_id": agent_id,
        "total_tokens": sum(m["total_tokens"] for m in models),
        "cost_usd": sum(m["cost_usd"] for m in models),
        "models": models,
    }


# ---- events -------------------------------------------------------------------------------------------


@app.get("/api/v1/events")
async def list_events(
    h: HubDep,
    stream: str | None = None,
    from_: Annotated[int, Query(alias="from", ge=0, le=INT64_MAX)] = 0,
    type: Annotated[list[str] | None, Query()] = None,
    limit: int = Query(100, ge=1, le=1000),
) -> list[dict[str, Any]]:
    events = await h.store.read_all(from_, types=type, stream=stream, limit=limit)
    return [e.model_dump(mode="json") for e in events]


def sse_id(cursor: Cursor) -> str:
    """An SSE event id: the event's commit-order cursor ``<tx_id>:<position>``, exact to resume from."""
    return f"{cursor[0]}:{cursor[1]}"


def parse_sse_id(value: str) -> Cursor | int:
    """A ``Last-Event-ID``: a cursor ``<tx_id>:<position>`` (what this route sends), or a bare position."""
    parts = value.strip().split(":")
    if len(parts) <= 2 and all(p.isascii() and p.isdigit() for p in parts):
        numbers = [int(p) for p in parts]
        if numbers[-1] <= INT64_MAX and numbers[0] <= XID8_MAX:
            return (numbers[0], numbers[1]) if len(numbers) == 2 else numbers[0]
    raise HTTPException(422, f"Last-Event-ID {value[:100]!r} is not an event id of this stream (<tx_id>:<position>)")


@app.get("/api/v1/events/stream")
async def stream_events(
    h: HubDep,
    from_: Annotated[int | None, Query(alias="from", ge=0, le=INT64_MAX)] = None,
    last_event_id: Annotated[str | None, Header(max_length=200)] = None,
) -> EventSourceResponse:
    """Server-sent events: catch up from ``from`` (a position; default: only new events), then live. Each event's
    id is its commit-order cursor; a reconnect's ``Last-Event-ID`` resumes right after it (and wins over
    ``from``)."""
    resume = parse_sse_id(last_event_id) if last_event_id else from_
    start: Cursor | Head | AfterPosition
    if resume is None:
        start = await h.store.head_cursor()
    elif isinstance(resume, tuple):
        start = resume
    else:
        start = AfterPosition(resume)  # every event above it, also one an older transaction commits later

    async def gen() -> AsyncIterator[dict[str, str]]:
        async for batch, _ in h.store.subscribe(start, poll_interval=0.5):
            for e in batch:
                yield {"id": sse_id(e.cursor), "event": e.type, "data": e.model_dump_json()}

    return EventSourceResponse(gen(), ping=15)


@app.post("/api/v1/streams/{stream:path}/events", status_code=201)
async def append_events(stream: str, body: AppendIn, h: HubDep) -> AppendOut:
    """A client's ``idempotency_key`` lives in its own namespace (``api:``), so it can never match a key the
    system's own appends use; a key used again for other events is a 422, not a silent no-op."""
    expected = {"any": ANY, "no_stream": NO_STREAM}.get(body.expected_version, body.expected_version)  # type: ignore[arg-type]
    key = None if body.idempotency_key is None else f"api:{body.idempotency_key}"
    try:
        storable(stream, "stream")
        events = [
            NewEvent(type=e.type, data=e.data, meta=Meta.model_validate({**e.meta, "actor": "api"}))
            for e in body.events
        ]
        try:
            res = await h.store.append(stream, events, expected, idempotency_key=key)
        finally:  # also when the outcome is unknown (503): the change may have been recorded
            if stream.startswith("agent-"):
                h.forget_agent(stream.removeprefix("agent-"))
        if res.replayed:
            await same_as_recorded(h, stream, events, res.positions, body.idempotency_key or "")
    except ValueError as e:
        if isinstance(e, ValidationError):
            raise
        raise HTTPException(422, str(e)) from None
    return AppendOut(positions=res.positions, versions=res.versions, replayed=res.replayed)


async def same_as_recorded(h: Hub, stream: str, events: list[NewEvent], positions: list[int], key: str) -> None:
    """A replayed append must be the one recorded under its key: the same stream, types and (normalised) data."""
    recorded = await h.store.read_where("position = ANY($1::bigint[])", positions)
    asked = [(stream, e.type, registry.validate(e.type, e.data, e.meta.schema_version)) for e in events]
    if [(r.stream, r.type, r.data) for r in recorded] != asked:
        where = recorded[0].stream if recorded else "?"
        raise HTTPException(
            422,
            f"idempotency_key {key!r} was already used for other events (in {where}); use a new key for new events",
        )


@app.get("/api/v1/streams/{stream:path}")
async def read_stream(
    stream: str, h: HubDep, from_version: Annotated[int, Query(ge=1, le=INT64_MAX)] = 1
) -> dict[str, Any]:
    events = await h.store.read_stream(stream, from_version)
    # The version of the events returned: read apart, an append committed in between made it newer than what the
    # client saw, and an append with it as ``expected_version`` went over an event the client never read.
    version = events[-1].version if events else await h.store.stream_version(stream)
    return {"stream": stream, "version": version, "events": [e.model_dump(mode="json") for e in events]}


# ---- system -------------------------------------------------------------------------------------------


@app.get("/api/v1/system/status")
async def system_status(h: HubDep) -> dict[str, Any]:
    return await h.ask(h.orchestrator.status.remote(), STATUS_TIMEOUT_S)


@app.post("/api/v1/projections/rebuild")
async def rebuild_projections(h: HubDep) -> dict[str, int]:
    # no deadline: a rebuild replays the whole log; only the orchestrator's death ends the wait early
    return {"projected": await h.ask(h.orchestrator.rebuild_projection.remote(), None)}


app.include_router(build_router())
document_bearer(app)
