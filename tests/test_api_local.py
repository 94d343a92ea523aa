"""The HTTP API in this process: the FastAPI app under uvicorn on a real port, on a real Postgres, without Ray.

Routes that need no actor (input checks, streams, SSE, idempotency, error mapping) are tested here; the whole
system over Ray Serve is tests/test_hub_api.py."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import fastapi.routing
import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from actors.agents.agent import agent_stream
from events import NewEvent
from events.hub import AgentCreated, AgentDeleted, AgentSettings, AgentStarted
from serve.app import app
from serve.deps import state
from serve.fast_route import PlainRequestRoute
from serve.hub import Hub
from serve.metrics import merge_expositions
from serve.schemas import MessageIn
from storage.errors import InvalidEvent, StoreUnavailable
from storage.eventlog import EventLog
from tests.conftest import free_port

TOKEN = "local-token"


class LocalIngress:
    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    async def hub(self) -> Hub:
        return self._hub


@pytest.fixture
async def hub(eventlog: EventLog) -> Hub:
    return Hub(eventlog, orchestrator=None, reply_timeout_s=5)


@pytest.fixture
async def api(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    saved = (state.ingress, state.api_token, state.max_body_bytes)
    state.ingress, state.api_token, state.max_body_bytes = LocalIngress(hub), TOKEN, 64 * 1024
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        ) as client:
            yield client
    finally:
        server.should_exit = server.force_exit = True
        await serving
        state.ingress, state.api_token, state.max_body_bytes = saved


async def running_agent(store: EventLog, agent_id: str) -> str:
    created = AgentCreated(agent_id=agent_id, name=agent_id, settings=AgentSettings())
    await store.append(agent_stream(agent_id), [NewEvent.of(created), NewEvent.of(AgentStarted())])
    return agent_id


async def read_sse(
    api: httpx.AsyncClient,
    n: int,
    *,
    params: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    then: Callable[[], Awaitable[object]] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The first ``n`` events of ``/api/v1/events/stream`` as (id, event); ``then`` runs once the stream is open."""
    got: list[tuple[str, dict[str, Any]]] = []

    async def read() -> None:
        async with api.stream("GET", "/api/v1/events/stream", params=params, headers=headers) as r:
            assert r.status_code == 200, await r.aread()
            if then is not None:
                await then()
            event_id = None
            async for line in r.aiter_lines():
                if line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("data:"):
                    got.append((event_id, json.loads(line[5:])))
                    if len(got) == n:
                        return

    await asyncio.wait_for(read(), 15)
    return got


async def append_started(store: EventLog, stream: str, n: int) -> list[int]:
    """``n`` events in ``stream``, each in its own transaction; their positions."""
    return [(await store.append(stream, [NewEvent.of(AgentStarted())])).positions[0] for _ in range(n)]


# ---- bad input: 422 with a JSON detail, never 500 ------------------------------------------------------


async def test_a_chat_id_too_long_for_its_stream_name_is_422(api: httpx.AsyncClient, eventlog: EventLog) -> None:
    agent_id = await running_agent(eventlog, "longchat")
    r = await api.post(f"/api/v1/agents/{agent_id}/messages", json={"text": "hi", "chat_id": "c" * 199})
    assert r.status_code == 422 and "chat_id" in r.json()["detail"] and "at most 191" in r.json()["detail"]
    r = await api.post(
        f"/api/v1/agents/{agent_id}/messages", json={"text": "hi", "chat_id": "c" * 191}, params={"timeout": 0.01}
    )
    assert r.status_code == 202  # the longest chat id that fits is recorded
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {
        "status": "accepted",
        "event_id": r.json()["event_id"],
        "correlation_id": r.json()["event_id"],
        "detail": "message recorded; the reply will arrive in the log",
    }


async def test_the_message_route_documents_both_answers(api: httpx.AsyncClient) -> None:
    """The route writes its JSON itself (no FastAPI encoding on the busiest route); its schema still says what."""
    answers = (await api.get("/openapi.json")).json()["paths"]["/api/v1/agents/{agent_id}/messages"]["post"]
    schemas = {code: a["content"]["application/json"]["schema"] for code, a in answers["responses"].items()}
    assert schemas["200"] == {"$ref": "#/components/schemas/MessageOut"}
    assert schemas["202"] == {"$ref": "#/components/schemas/Accepted"}


async def test_every_route_that_reads_a_projection_documents_fresh_and_no_other_does(api: httpx.AsyncClient) -> None:
    """``?fresh=true`` is offered where a read model is read, so clients can find it; the reads folded from the
    log need none (they see every committed event already)."""
    paths = (await api.get("/openapi.json")).json()["paths"]
    fresh = {
        path
        for path, operations in paths.items()
        if any(p["name"] == "fresh" for p in operations.get("get", {}).get("parameters", []))
    }
    assert fresh == {
        "/api/v1/agents",
        "/api/v1/agents/{agent_id}/chats/{chat_id}/messages",
        "/api/v1/agents/{agent_id}/usage",
        "/api/v1/runs/{run_id}",
        "/api/v1/runs/{run_id}/usage",
        "/api/v1/tasks",
        "/api/v1/roles/{role}/memory",
    }


@pytest.fixture
def solved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the requests FastAPI solved the parameters of (its handler's one call per request)."""
    seen: list[str] = []
    solve = fastapi.routing.solve_dependencies

    async def counting(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["request"].url.path)
        return await solve(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    return seen


async def test_a_plain_message_skips_fastapis_solving_and_anything_else_gets_its_answers(
    api: httpx.AsyncClient, eventlog: EventLog, solved: list[str]
) -> None:
    """``PlainRequestRoute``: a plainly valid request is read by the route; any other goes to FastAPI, whose 422s
    (and its acceptance of what it accepts) are unchanged."""
    agent_id = await running_agent(eventlog, "plain")
    url = f"/api/v1/agents/{agent_id}/messages"
    key = {"Idempotency-Key": "k" * 200}
    r = await api.post(
        url, json={"text": "hi", "chat_id": "c", "user_data": {"n": 1}}, params={"timeout": 0.01}, headers=key
    )
    assert r.status_code == 202 and solved == []
    again = await api.post(
        url, json={"text": "hi", "chat_id": "c", "user_data": {"n": 1}}, params={"timeout": "0.01"}, headers=key
    )
    assert again.status_code == 202 and again.json()["event_id"] == r.json()["event_id"] and solved == []
    refused = [
        ({"json": {"text": "hi", "chat_id": "c"}, "params": {"timeout": 0}}, ["query", "timeout"]),
        ({"json": {"text": "hi", "chat_id": "c"}, "params": {"timeout": 301}}, ["query", "timeout"]),
        ({"json": {"text": "hi", "chat_id": "c"}, "params": {"timeout": "soon"}}, ["query", "timeout"]),
        (
            {"json": {"text": "hi", "chat_id": "c"}, "headers": {"Idempotency-Key": "k" * 201}},
            ["header", "idempotency-key"],
        ),
        ({"json": {"chat_id": "c"}}, ["body", "text"]),
        ({"json": {"text": "hi", "chat_id": "c", "extra": 1}}, ["body", "extra"]),
    ]
    for request, loc in refused:
        r = await api.post(url, **request)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc, (request, r.json())
    assert solved == [url] * len(refused)
    # What FastAPI accepts and the route does not read is still accepted: a number in another form, a charset
    r = await api.post(url, json={"text": "hi", "chat_id": "c"}, params={"timeout": "1e-2"})
    assert r.status_code == 202
    body = json.dumps({"text": "hi", "chat_id": "c"}).encode()
    r = await api.post(
        url, content=body, params={"timeout": 0.01}, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert r.status_code == 202 and solved == [url] * (len(refused) + 2)


def test_a_plain_request_route_refuses_an_endpoint_it_would_not_read_whole() -> None:
    async def more(
        agent_id: str, body: MessageIn, h: Any, idempotency_key: str | None, timeout: float | None, x: int
    ) -> None:
        """One parameter more than the route reads."""

    async def no_model(agent_id: str, body: dict, h: Any, idempotency_key: str | None, timeout: float | None) -> None:
        """A body that is no pydantic model."""

    for endpoint in (more, no_model):
        with pytest.raises(TypeError, match="not what PlainRequestRoute reads"):
            PlainRequestRoute("/x/{agent_id}", endpoint, methods=["POST"])


async def test_a_deleted_agents_id_is_not_given_to_a_new_agent(api: httpx.AsyncClient, eventlog: EventLog) -> None:
    """Its chats, spending, runner checkpoint and idempotency keys stay with the id: a new agent under it answered
    with the old one's history in its prompts, within the old one's spent budget."""
    await running_agent(eventlog, "reused")
    await eventlog.append(agent_stream("reused"), [NewEvent.of(AgentDeleted())])
    r = await api.post("/api/v1/agents", json={"id": "reused", "name": "new", "settings": {}})
    assert r.status_code == 409 and r.json() == {
        "detail": "agent id 'reused' belonged to an agent that was deleted; choose another id"
    }
    assert (await api.post("/api/v1/agents", json={"id": "fresh", "name": "new", "settings": {}})).status_code == 201


async def test_the_schema_says_which_routes_need_the_bearer_token(api: httpx.AsyncClient) -> None:
    """The token is checked by middleware, outside FastAPI's dependencies; the schema still declares it."""
    schema = (await api.get("/openapi.json")).json()
    assert schema["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    operations = {(path, method): op for path, ops in schema["paths"].items() for method, op in ops.items()}
    guarded = {key for key in operations if key[0].startswith("/api/")}
    assert ("/api/v1/agents/{agent_id}/messages", "post") in guarded and ("/api/v1/runs", "post") in guarded
    for key, op in operations.items():
        if key in guarded:
            assert op["security"] == [{"bearer": []}] and "401" in op["responses"], key
        else:  # /healthz and /metrics answer without it
            assert "security" not in op, key
    assert {path for path, _ in operations if not path.startswith("/api/")} >= {"/healthz", "/metrics"}


async def test_integers_beyond_64_bits_and_nul_characters_are_422(api: httpx.AsyncClient, eventlog: EventLog) -> None:
    agent_id = await running_agent(eventlog, "badinput")
    url = f"/api/v1/agents/{agent_id}/messages"
    for body, where in [
        ({"text": "hi", "chat_id": "c", "user_data": {"n": 2**70}}, "user_data.n"),
        ({"text": "hi", "chat_id": "c", "user_data": {"deep": [1, {"n": -(2**64)}]}}, "user_data.deep[1].n"),
        ({"text": "a\u0000b", "chat_id": "c"}, "text"),
        ({"text": "hi", "chat_id": "c", "user_data": {"k\u0000": 1}}, "user_data key"),
        ({"text": "hi", "chat_id": "c", "platform_user_id": "\u0000"}, "platform_user_id"),
    ]:
        r = await api.post(url, json=body)
        assert r.status_code == 422, (body, r.text)
        assert where in json.dumps(r.json()["detail"]), r.json()
    events = "/api/v1/streams/agent-badinput/events"
    for event in [
        {"type": "agent.stopped", "data": {"reason": "x\u0000"}},
        {"type": "agent.stopped", "data": {"reason": "x"}, "meta": {"n": 2**64}},
        {"type": "agent.stopped", "data": {"reason": 2**80}},
    ]:
        r = await api.post(events, json={"events": [event]})
        assert r.status_code == 422 and r.json()["detail"], (event, r.text)
    r = await api.post(events, json={"events": [{"type": "agent.stopped", "data": {}}], "expected_version": 2**64})
    assert r.status_code == 422
    r = await api.post("/api/v1/streams/agent-x%00y/events", json={"events": [{"type": "agent.stopped", "data": {}}]})
    assert r.status_code == 422 and "NUL" in r.json()["detail"]
    assert (await api.get("/api/v1/streams/agent-x%00y")).status_code == 422
    assert (await api.get("/api/v1/events", params={"from": 2**64})).status_code == 422
    assert await eventlog.stream_version("agent-badinput") == 2  # nothing rejected was written


async def test_the_store_refusing_an_event_is_422(
    api: httpx.AsyncClient, eventlog: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent_id = await running_agent(eventlog, "refused")

    async def refuse(*_: object, **__: object) -> None:
        raise InvalidEvent("cannot store that")

    monkeypatch.setattr(eventlog, "append", refuse)
    r = await api.post(f"/api/v1/agents/{agent_id}/messages", json={"text": "hi", "chat_id": "c"})
    assert r.status_code == 422 and r.json() == {"detail": "cannot store that"}
    r = await api.post("/api/v1/streams/agent-refused/events", json={"events": [{"type": "agent.stopped", "data": {}}]})
    assert r.status_code == 422 and r.json() == {"detail": "cannot store that"}


async def test_a_lost_connection_says_the_outcome_is_unknown(
    api: httpx.AsyncClient, eventlog: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent_id = await running_agent(eventlog, "dropped")

    async def drop(*_: object, **__: object) -> None:
        raise StoreUnavailable("event store unavailable: ConnectionResetError")

    monkeypatch.setattr(eventlog, "append", drop)
    r = await api.post(f"/api/v1/agents/{agent_id}/messages", json={"text": "hi", "chat_id": "c"})
    detail = r.json()["detail"]
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "outcome is unknown" in detail and "same Idempotency-Key" in detail and "nothing was recorded" not in detail


# ---- idempotency ----------------------------------------------------------------------------------------


async def test_an_idempotency_key_reused_for_another_message_is_refused(
    api: httpx.AsyncClient, eventlog: EventLog
) -> None:
    agent_id = await running_agent(eventlog, "idem")
    url, key = f"/api/v1/agents/{agent_id}/messages", {"Idempotency-Key": "k1"}
    body = {"text": "pay invoice 7", "chat_id": "idem"}
    first = await api.post(url, json=body, headers=key, params={"timeout": 0.01})
    again = await api.post(url, json=body, headers=key, params={"timeout": 0.01})
    assert first.status_code == again.status_code == 202  # no runner here: the reply never comes
    assert first.json()["event_id"] == again.json()["event_id"]
    for other in [{**body, "text": "pay invoice 8"}, {**body, "chat_id": "elsewhere"}, {**body, "channel": "sms"}]:
        r = await api.post(url, json=other, headers=key, params={"timeout": 0.01})
        assert r.status_code == 422, (other, r.text)
        assert "Idempotency-Key 'k1' was already used for a different message" in r.json()["detail"]
        assert first.json()["event_id"] in r.json()["detail"]
    assert [e.data["text"] for e in await eventlog.read_stream("chat-idem/idem")] == ["pay invoice 7"]
    assert await eventlog.read_stream("chat-idem/elsewhere") == []


async def test_a_raw_append_key_used_again_for_other_events_is_refused_and_has_its_own_namespace(
    api: httpx.AsyncClient, eventlog: EventLog
) -> None:
    url = "/api/v1/streams/agent-raw/events"
    body = {"events": [{"type": "agent.stopped", "data": {"reason": "maintenance"}}], "idempotency_key": "op-1"}
    first = await api.post(url, json=body)
    again = await api.post(url, json=body)
    assert first.status_code == again.status_code == 201
    assert again.json() == {**first.json(), "replayed": True}
    other_events = {**body, "events": [{"type": "agent.started", "data": {}}]}
    for other_url, other in [(url, other_events), ("/api/v1/streams/agent-elsewhere/events", body)]:
        r = await api.post(other_url, json=other)
        assert r.status_code == 422, r.text
        assert "idempotency_key 'op-1' was already used for other events (in agent-raw)" in r.json()["detail"]
    assert [e.type for e in await eventlog.read_stream("agent-raw")] == ["agent.stopped"]
    assert await eventlog.read_stream("agent-elsewhere") == []

    # a client's key never matches one of the system's own: the message route's key for agent "desk"
    agent_id = await running_agent(eventlog, "desk")
    taken = {**body, "idempotency_key": f"msg:{agent_id}:k1"}
    assert (await api.post("/api/v1/streams/agent-raw2/events", json=taken)).status_code == 201
    r = await api.post(
        f"/api/v1/agents/{agent_id}/messages",
        json={"text": "hi", "chat_id": "c"},
        headers={"Idempotency-Key": "k1"},
        params={"timeout": 0.01},
    )
    assert r.status_code == 202 and [e.data["text"] for e in await eventlog.read_stream("chat-desk/c")] == ["hi"]


async def test_patch_takes_the_seeds_stored_settings_form(api: httpx.AsyncClient, eventlog: EventLog) -> None:
    agent_id = await running_agent(eventlog, "seedform")
    r = await api.patch(f"/api/v1/agents/{agent_id}", json={"settings": {"simple": {"settings": {"temperature": 0.1}}}})
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["temperature"] == 0.1
    assert r.json()["settings"]["system_prompt"] == AgentSettings().system_prompt  # merged, not replaced


# ---- auth and the orchestrator's faults -----------------------------------------------------------------


async def test_an_anonymous_request_is_401_before_its_body_is_read(api: httpx.AsyncClient) -> None:
    """FastAPI parses a body before it resolves a route's dependencies: the check runs before both."""
    anon = {"Authorization": ""}
    for body in (b"{not json", b"x" * (64 * 1024 + 1)):
        r = await api.post("/api/v1/agents", content=body, headers={**anon, "content-type": "application/json"})
        assert r.status_code == 401 and r.json() == {"detail": "missing or wrong bearer token"}
        assert r.headers["www-authenticate"] == "Bearer"
    for header in ("Bearer wrong", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x"):
        assert (await api.get("/api/v1/agents", headers={"Authorization": header})).status_code == 401
    assert (await api.get("/api/v1/agents", headers={"Authorization": f"bearer {TOKEN}"})).status_code == 200
    assert (await api.post("/api/v1/agents", content=b"{not json")).status_code == 422  # with the token: parsed


async def test_a_run_cannot_name_a_directory_of_the_host_as_its_workspace(api: httpx.AsyncClient) -> None:
    for where in ("/etc", "../../etc", "a/b", ".hidden", ""):
        r = await api.post("/api/v1/runs", json={"goal": "g", "workspace": where})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "workspace"], (where, r.text)


class Orchestrator:
    """Stands in for the orchestrator's Ray handle: ``status.remote()`` gives what ``answer`` makes."""

    def __init__(self, answer: Callable[[], Awaitable[Any]]) -> None:
        self.answer = answer

    @property
    def status(self) -> Any:
        return self

    def remote(self) -> Awaitable[Any]:
        return self.answer()


async def test_a_dead_stuck_or_failing_orchestrator_is_a_json_error_not_a_hang(
    api: httpx.AsyncClient, hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.exceptions import ActorDiedError

    import serve.app

    async def dead() -> Any:
        raise ActorDiedError()

    async def stuck() -> Any:
        await asyncio.sleep(3600)

    async def broken() -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(serve.app, "STATUS_TIMEOUT_S", 0.2)
    expected = [
        (dead, 503, "orchestrator unavailable (ActorDiedError); retry later"),
        (stuck, 503, "orchestrator did not answer within 0.2 s; retry later"),
        (broken, 500, "internal error: RuntimeError"),
    ]
    for answer, status, detail in expected:
        hub.orchestrator = Orchestrator(answer)
        r = await api.get("/api/v1/system/status")
        assert (r.status_code, r.json()) == (status, {"detail": detail})


# ---- streams whose names contain "/" (chats) ------------------------------------------------------------


async def test_chat_streams_are_reachable_by_name(api: httpx.AsyncClient) -> None:
    event = {"type": "chat.message_received", "data": {"agent_id": "desk", "text": "hi", "chat_id": "alice"}}
    r = await api.post("/api/v1/streams/chat-desk/alice/events", json={"events": [event], "expected_version": 0})
    assert r.status_code == 201, r.text
    assert r.json()["versions"] == [1]
    r = await api.get("/api/v1/streams/chat-desk/alice")
    assert r.status_code == 200 and r.json()["stream"] == "chat-desk/alice" and r.json()["version"] == 1
    assert r.json()["events"][0]["data"]["text"] == "hi"
    # a chat called "events": the route for appends takes the last "/events" as its own
    r = await api.post("/api/v1/streams/chat-desk/events/events", json={"events": [event]})
    assert r.status_code == 201
    assert (await api.get("/api/v1/streams/chat-desk/events")).json()["version"] == 1
    assert (await api.get("/api/v1/streams/chat-desk%2Falice")).json()["version"] == 1


# ---- server-sent events ---------------------------------------------------------------------------------


async def test_a_streams_version_is_that_of_the_events_read_with_it(
    api: httpx.AsyncClient, eventlog: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer commits between the route's reads: the version returned is still the last one the client
    saw, so its append with that expected version is a 409, not a write over an event it never read."""
    read = eventlog.read_stream

    async def read_then_another_writes(stream: str, *args: Any, **kw: Any) -> Any:
        events = await read(stream, *args, **kw)
        await eventlog.append(stream, [NewEvent.of(AgentStarted())])  # a concurrent writer
        return events

    await eventlog.append("agent-race", [NewEvent.of(AgentStarted())])
    monkeypatch.setattr(eventlog, "read_stream", read_then_another_writes)
    body = (await api.get("/api/v1/streams/agent-race")).json()
    assert body["version"] == body["events"][-1]["version"] == 1
    monkeypatch.undo()
    event = {"type": "agent.stopped", "data": {}}
    r = await api.post("/api/v1/streams/agent-race/events", json={"events": [event], "expected_version": 1})
    assert r.status_code == 409 and (await api.get("/api/v1/streams/agent-race")).json()["version"] == 2


async def test_sse_from_a_gap_or_past_the_head_and_nonsense(api: httpx.AsyncClient, eventlog: EventLog) -> None:
    (before,) = await append_started(eventlog, "agent-sse", 1)
    gap = int(await eventlog.fetchval("SELECT nextval(pg_get_serial_sequence('events', 'position'))"))
    assert gap > before
    after = await append_started(eventlog, "agent-sse", 2)
    assert after[0] > gap  # no event at position ``gap``
    got = await read_sse(api, 2, params={"from": gap})
    assert [e["position"] for _, e in got] == after

    got = await read_sse(
        api, 1, params={"from": after[-1] + 1000}, then=lambda: append_started(eventlog, "agent-sse-later", 1)
    )
    assert got[0][1]["stream"] == "agent-sse-later"

    for params in [{"from": -1}, {"from": "x"}, {"from": 2**64}]:
        r = await api.get("/api/v1/events/stream", params=params)
        assert r.status_code == 422 and r.headers["content-type"] == "application/json", params
    r = await api.get("/api/v1/events/stream", headers={"Last-Event-ID": "not-an-id"})
    assert r.status_code == 422 and "Last-Event-ID" in r.json()["detail"]


async def test_sse_resumes_after_last_event_id(api: httpx.AsyncClient, eventlog: EventLog) -> None:
    positions = await append_started(eventlog, "agent-resume", 5)
    first = await read_sse(api, 2, params={"from": positions[0] - 1})
    assert [e["position"] for _, e in first] == positions[:2]
    last_id = first[-1][0]
    assert last_id == f"{first[-1][1]['tx_id']}:{positions[1]}"  # the commit-order cursor
    # the reconnect's Last-Event-ID wins over the original ``from``
    resumed = await read_sse(api, 3, params={"from": positions[0] - 1}, headers={"Last-Event-ID": last_id})
    assert [e["position"] for _, e in resumed] == positions[2:]
    by_position = await read_sse(api, 1, headers={"Last-Event-ID": str(positions[3])})  # a bare position
    assert by_position[0][1]["position"] == positions[4]


# ---- /metrics -------------------------------------------------------------------------------------------


def test_merged_metrics_keep_an_actor_label_of_their_own() -> None:
    orchestrator = (
        b"# HELP agenthub_actor_restarts_total Actors restarted by the orchestrator\n"
        b"# TYPE agenthub_actor_restarts_total counter\n"
        b'agenthub_actor_restarts_total{actor="agent:a"} 2.0\n'
        b'agenthub_actor_restarts_total{actor="agent:b"} 1.0\n'
        b"# HELP agenthub_events_appended_total Events appended\n"
        b"# TYPE agenthub_events_appended_total counter\n"
        b"agenthub_events_appended_total 5.0\n"
    )
    ingress = b"# HELP agenthub_events_appended_total Events appended\n# TYPE agenthub_events_appended_total counter\n"
    ingress += b"agenthub_events_appended_total 3.0\n"
    page = merge_expositions({"ingress": ingress, "orchestrator": orchestrator})
    lines = page.splitlines()
    assert 'agenthub_actor_restarts_total{actor="agent:a",source="orchestrator"} 2.0' in lines
    assert 'agenthub_actor_restarts_total{actor="agent:b",source="orchestrator"} 1.0' in lines
    assert 'agenthub_events_appended_total{actor="orchestrator"} 5.0' in lines
    assert 'agenthub_events_appended_total{actor="ingress"} 3.0' in lines
    samples = [line.split(" ")[0] for line in lines if not line.startswith("#")]
    assert len(samples) == len(set(samples))  # no duplicate series
    nested = merge_expositions({"x": b'm_total{actor="a",source="b"} 1.0\n'})
    assert 'm_total{actor="a",exported_source="x",source="b"} 1.0' in nested


def http_samples(page: str) -> Counter[tuple[str, ...]]:
    """The ingress's request counts by (method, route, status) and latency observations by (method, route)."""
    out: Counter[tuple[str, ...]] = Counter()
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            if s.name == "agenthub_http_requests_total":
                out[(s.labels["method"], s.labels["route"], s.labels["status"])] += int(s.value)
            elif s.name == "agenthub_http_request_duration_seconds_count":
                out[("latency", s.labels["method"], s.labels["route"])] += int(s.value)
    return out


async def test_requests_are_counted_by_route_template_and_status(api: httpx.AsyncClient, eventlog: EventLog) -> None:
    """Route templates, not raw paths, so clients cannot grow the number of series; the body limit's 413 and
    paths no route takes are counted too, as one ``unmatched`` series."""
    agent_id = await running_agent(eventlog, "counted")
    before = http_samples((await api.get("/metrics")).text)
    message = f"/api/v1/agents/{agent_id}/messages"
    r = await api.post(message, json={"text": "hi", "chat_id": "c"}, params={"timeout": 0.01})
    assert r.status_code == 202
    assert (await api.get("/api/v1/agents/nobody")).status_code == 404
    assert (await api.get("/api/v1/agents/nobody", headers={"Authorization": "Bearer wrong"})).status_code == 401
    big = b"x" * (64 * 1024 + 1)
    assert (await api.post(message, content=big, headers={"content-type": "application/json"})).status_code == 413
    assert (await api.get("/no/such/path/1")).status_code == 404
    assert (await api.get("/no/such/path/2")).status_code == 404
    delta = http_samples((await api.get("/metrics")).text) - before
    route, agent = "/api/v1/agents/{agent_id}/messages", "/api/v1/agents/{agent_id}"
    assert delta == {
        ("GET", "/metrics", "200"): 1,  # the first read: counted once its answer was sent
        ("latency", "GET", "/metrics"): 1,
        ("POST", route, "202"): 1,
        ("latency", "POST", route): 1,
        ("GET", agent, "404"): 1,
        ("latency", "GET", agent): 1,
        ("GET", "unmatched", "401"): 1,  # refused before routing
        ("POST", "unmatched", "413"): 1,
        ("GET", "unmatched", "404"): 2,
        ("latency", "POST", "unmatched"): 1,
        ("latency", "GET", "unmatched"): 3,
    }
