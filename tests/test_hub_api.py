"""The agent hub over real HTTP (Ray Serve), real Ray actors and a real Postgres."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import ray
from ray.util.state import list_actors

from bench.chaos import replica_names
from cluster.bootstrap import RAY_ENV, System
from storage.eventlog import EventLog
from tests.conftest import eventually, free_port, new_agent
from tests.fakes.openai_server import FakeOpenAI


async def test_every_api_route_needs_the_bearer_token(system: System, http: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(base_url=system.api_url) as anon:
        assert (await anon.get("/api/v1/agents")).status_code == 401
        r = await anon.get("/api/v1/agents", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json() == {"detail": "missing or wrong bearer token"}
        health = await anon.get("/healthz")
        assert health.status_code == 200 and health.json()["checks"] == {
            "database": "ok",
            "orchestrator": "ok",
            "delivery": "ok",
        }
    assert (await http.get("/api/v1/agents")).status_code == 200


async def test_agent_crud_follows_the_seed_config(http: httpx.AsyncClient) -> None:
    seed_form = {
        "simple": {
            "settings": {
                "system_prompt": "Ты помощник",
                "model_id": "gpt-4",
                "provider": "openai",
                "temperature": 0.2,
                "integrations": [],
            }
        }
    }
    r = await http.post("/api/v1/agents", json={"id": "crud_1", "name": "CRUD", "settings": seed_form})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["settings"]["system_prompt"] == "Ты помощник" and body["status"] == "stopped" and body["version"] == 1
    assert (await http.post("/api/v1/agents", json={"id": "crud_1", "name": "again"})).status_code == 409
    r = await http.patch("/api/v1/agents/crud_1", json={"name": "Renamed", "settings": {"temperature": 0.9}})
    assert r.status_code == 200 and r.json()["name"] == "Renamed"
    assert r.json()["settings"]["temperature"] == 0.9 and r.json()["settings"]["model_id"] == "gpt-4"
    listed = await eventually_listed(http, "crud_1", "Renamed")
    assert listed["status"] == "stopped"
    assert (await http.delete("/api/v1/agents/crud_1")).status_code == 204
    for method, path in [
        ("GET", "/api/v1/agents/crud_1"),
        ("POST", "/api/v1/agents/crud_1/start"),
        ("PATCH", "/api/v1/agents/crud_1"),
        ("DELETE", "/api/v1/agents/crud_1"),
    ]:
        r = await http.request(method, path, json={} if method == "PATCH" else None)
        assert r.status_code == 404 and "unknown agent" in r.json()["detail"]


async def eventually_listed(http: httpx.AsyncClient, agent_id: str, name: str) -> dict:
    found: dict = {}

    async def check() -> bool:
        for a in (await http.get("/api/v1/agents")).json():
            if a["id"] == agent_id and a["name"] == name:
                found.update(a)
                return True
        return False

    await eventually(check, what="agent in the projection")
    return found


async def test_bad_input_gets_a_clear_error(http: httpx.AsyncClient) -> None:
    r = await http.post("/api/v1/agents", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    r = await http.post("/api/v1/agents", json={"name": "x", "settings": {"temperature": 7}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "temperature"
    r = await http.post("/api/v1/agents", json={"name": "x", "id": "no spaces allowed"})
    assert r.status_code == 422
    r = await http.post("/api/v1/agents/nobody/messages", json={"text": "hi", "chat_id": "c"})
    assert r.status_code == 404
    r = await http.post("/api/v1/agents", json={"name": "x" * 40_000})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit applies while the body is read
        for _ in range(40):
            yield b" " * 10_000

    r = await http.post("/api/v1/agents", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]


async def test_message_to_a_stopped_agent_is_refused(http: httpx.AsyncClient) -> None:
    agent_id = await new_agent(http, start=False)
    r = await http.post(f"/api/v1/agents/{agent_id}/messages", json={"text": "hi", "chat_id": "c"})
    assert r.status_code == 409 and "stopped" in r.json()["detail"]


async def test_conversation_history_usage_and_events(http: httpx.AsyncClient) -> None:
    agent_id = await new_agent(http, system_prompt="be brief", model_id="m1")
    replies = []
    for text in ["first", "second", "third"]:
        r = await http.post(
            f"/api/v1/agents/{agent_id}/messages",
            json={"text": text, "chat_id": "chat-1", "platform_user_id": "u1", "channel": "telegram"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["chat_id"] == "chat-1" and r.json()["channel"] == "telegram"
        replies.append(r.json()["response"])
    assert replies[2] == "[m1] turn 3: you said 'third'"  # the agent saw the whole chat history

    fresh = {"fresh": "true"}  # the read models as of the last reply, not of the projector's last delivery
    hist = (await http.get(f"/api/v1/agents/{agent_id}/chats/chat-1/messages", params=fresh)).json()
    assert [h["role"] for h in hist] == ["user", "assistant"] * 3 and hist[-1]["text"] == replies[2]
    usage = (await http.get(f"/api/v1/agents/{agent_id}/usage", params=fresh)).json()
    assert usage["models"][0]["calls"] == 3 and usage["total_tokens"] > 0

    events = (await http.get("/api/v1/events", params={"stream": f"chat-{agent_id}/chat-1"})).json()
    assert [e["type"] for e in events] == ["chat.message_received", "llm.completed", "chat.reply_sent"] * 3
    completion = events[1]
    assert completion["data"]["model"] == "m1" and completion["data"]["latency_ms"] >= 0
    assert completion["meta"]["causation_id"] == events[0]["id"] == events[2]["meta"]["correlation_id"]
    only = (await http.get("/api/v1/events", params={"type": "llm.completed", "from": events[0]["position"]})).json()
    assert {e["type"] for e in only} == {"llm.completed"} and len(only) >= 3
    stream = (await http.get(f"/api/v1/streams/chat-{agent_id}/chat-1")).json()  # a chat stream's "/" in the path
    assert stream["version"] == 9 and [e["id"] for e in stream["events"]] == [e["id"] for e in events]


async def test_idempotency_key_answers_a_retry_once(http: httpx.AsyncClient, hub_log: EventLog) -> None:
    agent_id = await new_agent(http)
    body = {"text": "pay invoice 7", "chat_id": "idem"}
    first = await http.post(f"/api/v1/agents/{agent_id}/messages", json=body, headers={"Idempotency-Key": "k1"})
    again = await http.post(f"/api/v1/agents/{agent_id}/messages", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 200
    assert first.json()["event_id"] == again.json()["event_id"]
    assert first.json()["reply_event_id"] == again.json()["reply_event_id"]
    types = [e.type for e in await hub_log.read_stream(f"chat-{agent_id}/idem")]
    assert types == ["chat.message_received", "llm.completed", "chat.reply_sent"]


async def test_reply_timeout_returns_202_and_the_reply_still_arrives(
    http: httpx.AsyncClient, hub_log: EventLog
) -> None:
    agent_id = await new_agent(http)
    r = await http.post(
        f"/api/v1/agents/{agent_id}/messages",
        params={"timeout": 0.001},
        json={"text": "slow", "chat_id": "late"},
    )
    assert r.status_code == 202 and r.json()["status"] == "accepted"
    event_id = r.json()["event_id"]

    async def replied() -> bool:
        events = await hub_log.read_stream(f"chat-{agent_id}/late")
        return any(e.type == "chat.reply_sent" and str(e.meta.correlation_id) == event_id for e in events)

    await eventually(replied, what="the late reply in the log")


async def test_append_endpoint_enforces_versions_types_and_size(http: httpx.AsyncClient) -> None:
    url = "/api/v1/streams/agent-appendtest/events"
    ok = await http.post(url, json={"events": [{"type": "agent.started", "data": {}}], "expected_version": "no_stream"})
    assert ok.status_code == 201 and ok.json()["versions"] == [1]
    r = await http.post(url, json={"events": [{"type": "agent.started", "data": {}}], "expected_version": 0})
    assert r.status_code == 409 and r.json()["actual_version"] == 1
    r = await http.post(url, json={"events": [{"type": "agent.exploded", "data": {}}]})
    assert r.status_code == 422 and "unknown event type" in r.json()["detail"]
    r = await http.post(url, json={"events": [{"type": "agent.stopped", "data": {"reason": 5}}]})
    assert r.status_code == 422
    r = await http.post(url, json={"events": [{"type": "agent.stopped", "data": {"reason": "x" * 17_000}}]})
    assert r.status_code == 413
    body = {"events": [{"type": "agent.stopped", "data": {}}], "idempotency_key": "append-1"}
    a, b = await http.post(url, json=body), await http.post(url, json=body)
    assert a.json()["positions"] == b.json()["positions"] and b.json()["replayed"] is True
    stream = (await http.get("/api/v1/streams/agent-appendtest")).json()
    assert stream["version"] == 2  # nothing rejected was written, the retry added nothing


async def test_integration_secrets_never_reach_the_log(http: httpx.AsyncClient, hub_log: EventLog) -> None:
    r = await http.post(
        "/api/v1/agents",
        json={
            "name": "tg",
            "settings": {
                "integrations": [{"type": "telegram", "settings": {"enabled": True, "bot_token": "123:SECRET"}}]
            },
        },
    )
    agent_id = r.json()["id"]
    ref = r.json()["settings"]["integrations"][0]["settings"]["bot_token"]
    assert ref.startswith("secret://")
    raw = json.dumps([e.model_dump(mode="json") for e in await hub_log.read_stream(f"agent-{agent_id}")])
    assert "123:SECRET" not in raw
    async with hub_log.connection() as c:
        assert await c.fetchval("SELECT value FROM secrets WHERE ref = $1", ref) == "123:SECRET"


async def test_sse_stream_delivers_new_events(http: httpx.AsyncClient) -> None:
    """Without ``from``, only what commits after the request: the agent's ``agent.created`` came before it."""
    agent_id = await new_agent(http, start=False)
    got: list[dict] = []
    open_ = asyncio.Event()

    async def listen() -> None:
        async with http.stream("GET", "/api/v1/events/stream") as resp:
            assert resp.status_code == 200
            open_.set()  # the head is taken before the response starts
            event_id = None
            async for line in resp.aiter_lines():
                if line.startswith("id:"):
                    event_id = line[3:].strip()
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    if event["stream"] == f"agent-{agent_id}":
                        got.append(event)
                        assert event_id == f"{event['tx_id']}:{event['position']}"  # resumable (Last-Event-ID)
                        return

    task = asyncio.create_task(listen())
    await asyncio.wait_for(open_.wait(), 15)
    await http.post(f"/api/v1/agents/{agent_id}/start")
    await asyncio.wait_for(task, 15)
    assert got[0]["type"] == "agent.started"


async def test_metrics_cover_appends_routing_handlers_and_tokens(http: httpx.AsyncClient) -> None:
    agent_id = await new_agent(http)
    assert (
        await http.post(f"/api/v1/agents/{agent_id}/messages", json={"text": "m", "chat_id": "m"})
    ).status_code == 200
    text = (await http.get("/metrics")).text
    for name in [
        "agenthub_events_appended_total",
        "agenthub_routing_lag_seconds",
        "agenthub_routed_events_total",
        "agenthub_handler_latency_seconds_bucket",
        "agenthub_llm_tokens_total",
        'agenthub_http_requests_total{actor="ingress",method="POST",route="/api/v1/agents/{agent_id}/messages"',
    ]:
        assert name in text, name
    assert f'actor="agent:{agent_id}"' in text
    assert text.count("# TYPE agenthub_events_appended counter") == 1  # merged into one family


async def test_actors_have_readable_names_in_the_dashboard(system: System, http: httpx.AsyncClient) -> None:
    agent_id = await new_agent(http)
    await http.post(f"/api/v1/agents/{agent_id}/messages", json={"text": "m", "chat_id": "n"})
    names = {a.name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)}
    assert {"orchestrator", "llm", "projector", f"agent:{agent_id}"} <= names


def test_haproxy_holds_the_api_port(system: System) -> None:
    """Serve's throughput-optimized mode is on: HAProxy, not a Python proxy actor, listens on the API port."""
    port = system.settings.http_port
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and {psutil.Process(c.pid).name() for c in listening} == {"haproxy"}
    # and it sends no log datagram per request to Serve's Python HAProxy manager (the ingress counts requests)
    config = psutil.Process(listening[0].pid).cmdline()
    text = Path(config[config.index("-f") + 1]).read_text()
    assert "frontend" in text and "log-format-sd" not in text
    assert "nbthread 1" in [line.strip() for line in text.splitlines()]  # one thread (RAY_ENV)


def test_serves_upkeep_runs_at_the_pace_set_for_it(system: System) -> None:
    """Serve's controller reconciles every 0.5 s, not 0.1 s, and a replica sends its metrics every second: on an
    idle system the controller's loop at 0.1 s took ~106 ms of CPU a second, a twentieth of these two cores."""
    from ray.serve._private import constants

    controller = ray.get_actor(constants.SERVE_CONTROLLER_NAME, namespace=constants.SERVE_NAMESPACE)
    replica = ray.get_actor(replica_names()[0], namespace=constants.SERVE_NAMESPACE)

    def paces(_: object) -> tuple[float, int]:
        from ray.serve._private import constants  # the actor's own values, not this process's

        return constants.CONTROL_LOOP_INTERVAL_S, constants.RAY_SERVE_METRICS_EXPORT_INTERVAL_MS

    assert ray.get(controller.__ray_call__.remote(paces))[0] == 0.5
    assert ray.get(replica.__ray_call__.remote(paces))[1] == 1000


async def test_the_actors_share_the_cpu_with_rays_own_processes(system: System, http: httpx.AsyncClient) -> None:
    """Ray starts its workers at nice 15 unless told otherwise: the dashboard agent's stats pass then took a core
    from every actor of the message path at once (``RAY_worker_niceness`` in ``RAY_ENV``)."""
    agent_id = await new_agent(http)
    await http.post(f"/api/v1/agents/{agent_id}/messages", json={"text": "m", "chat_id": "nice"})  # its runner is up
    ns = system.settings.ray_namespace
    actors = [ray.get_actor(name, namespace=ns) for name in ("orchestrator", "projector", f"agent:{agent_id}")]
    actors.append(ray.get_actor(replica_names()[0], namespace="serve"))
    pids = await asyncio.gather(*(a.__ray_call__.remote(lambda actor: os.getpid()) for a in actors))
    agent = next(p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0] == "ray::DashboardAgent")
    assert {psutil.Process(pid).nice() for pid in pids} == {agent.nice()} == {0}


def test_a_ray_cluster_starts_ray_and_serve_as_the_local_bootstrap_does() -> None:
    yaml = (Path(__file__).parent.parent / "ray-cluster.yaml").read_text()
    starts = [line for line in yaml.splitlines() if "ray start" in line]
    assert len(starts) == 2
    for line in starts:
        for key, value in RAY_ENV.items():
            assert f"{key}={value} " in line, (key, line)


async def test_openai_compatible_provider_over_http(http: httpx.AsyncClient, hub_log: EventLog) -> None:
    with FakeOpenAI(free_port(), reply="Здравствуйте! Чем помочь?") as fake:
        agent_id = await new_agent(
            http,
            provider="openai_compatible",
            model_id="llama-3-8b",
            base_url=fake.base_url,
            system_prompt="sys",
        )
        r = await http.post(f"/api/v1/agents/{agent_id}/messages", json={"text": "привет", "chat_id": "oa"})
        assert r.status_code == 200 and r.json()["response"] == "Здравствуйте! Чем помочь?"
        sent = fake.requests[0]
        assert sent["model"] == "llama-3-8b" and sent["messages"][0] == {"role": "system", "content": "sys"}
        assert sent["messages"][-1] == {"role": "user", "content": "привет"}
    (done,) = [e for e in await hub_log.read_stream(f"chat-{agent_id}/oa") if e.type == "llm.completed"]
    assert done.data["provider"] == "openai_compatible" and done.data["total_tokens"] == done.data["prompt_tokens"] + 6


async def test_a_slow_reply_holds_up_neither_other_agents_nor_other_chats(
    http: httpx.AsyncClient, hub_log: EventLog
) -> None:
    """Two messages of the slow chat out in two deliveries (the second waits behind the first) held up the agent's
    other chats too, until one of them returned: a runner had two deliveries in flight at most."""
    with FakeOpenAI(free_port(), reply="worth the wait") as fake:
        slow = await new_agent(http, provider="openai_compatible", base_url=fake.base_url)
        quick = await new_agent(http)
        warm = await http.post(f"/api/v1/agents/{quick}/messages", json={"text": "warm up", "chat_id": "q"})
        assert warm.status_code == 200
        fake.fail(delay_s=6)  # the next completion takes six seconds
        for text in ("think", "and then?"):
            r = await http.post(
                f"/api/v1/agents/{slow}/messages", params={"timeout": 0.001}, json={"text": text, "chat_id": "slow"}
            )
            assert r.status_code == 202

            async def thinking(out: int = 1 if text == "think" else 2) -> bool:
                runner = (await http.get("/api/v1/system/status")).json()["subscribers"][f"agent:{slow}"]
                return fake.hits == 1 and runner["in_flight"] == out

            await eventually(thinking, what=f"the slow completion to start, {text!r} delivered")
        other_agent = await http.post(f"/api/v1/agents/{quick}/messages", json={"text": "hi", "chat_id": "q"})
        other_chat = await http.post(f"/api/v1/agents/{slow}/messages", json={"text": "quick", "chat_id": "fast"})
        assert other_agent.status_code == 200 and other_chat.status_code == 200
        assert other_chat.json()["response"] == "worth the wait"
        still = [e.type for e in await hub_log.read_stream(f"chat-{slow}/slow")]
        assert still == ["chat.message_received"] * 2  # both answered while the slow one was still thinking

        async def answered() -> bool:
            replies = [e for e in await hub_log.read_stream(f"chat-{slow}/slow") if e.type == "chat.reply_sent"]
            return len(replies) == 2

        await eventually(answered, what="the slow reply")


async def test_provider_failure_is_recorded_and_answered_502(http: httpx.AsyncClient, hub_log: EventLog) -> None:
    agent_id = await new_agent(http, provider="openai_compatible", base_url=f"http://127.0.0.1:{free_port()}/v1")
    r = await http.post(f"/api/v1/agents/{agent_id}/messages", json={"text": "anyone?", "chat_id": "down"})
    assert r.status_code == 502 and "failed to reply" in r.json()["detail"]
    types = [e.type for e in await hub_log.read_stream(f"chat-{agent_id}/down")]
    assert types == ["chat.message_received", "chat.reply_failed"]


async def test_agent_budget_stops_replies_until_it_is_raised(
    system: System, http: httpx.AsyncClient, hub_log: EventLog
) -> None:
    # the scripted provider is priced as the model it stands in for: one short exchange costs ~$0.000006
    agent_id = await new_agent(http, model_id="gpt-4o-mini", budget_usd=0.000001)
    url = f"/api/v1/agents/{agent_id}/messages"
    assert (await http.post(url, json={"text": "first", "chat_id": "b"})).status_code == 200
    r = await http.post(url, json={"text": "second", "chat_id": "b"})
    assert r.status_code == 402 and "agent budget exceeded" in r.json()["detail"]
    (failed,) = [e for e in await hub_log.read_stream(f"chat-{agent_id}/b") if e.type == "chat.reply_failed"]
    assert failed.data["budget_exceeded"] is True
    ray.kill(ray.get_actor(f"agent:{agent_id}", namespace=system.settings.ray_namespace), no_restart=True)
    r = await http.post(url, json={"text": "after a restart", "chat_id": "b"}, params={"timeout": 60})
    assert r.status_code == 402  # the restarted runner summed the spending from the log
    patched = await http.patch(f"/api/v1/agents/{agent_id}", json={"settings": {"budget_usd": 1.0}})
    assert patched.status_code == 200
    assert (await http.post(url, json={"text": "third", "chat_id": "b"})).status_code == 200


async def test_projection_rebuild_replays_the_log(http: httpx.AsyncClient) -> None:
    agent_id = await new_agent(http)
    await http.post(f"/api/v1/agents/{agent_id}/messages", json={"text": "keep me", "chat_id": "rb"})
    await eventually(lambda: _history_len(http, agent_id, "rb", 2), what="projection")
    r = await http.post("/api/v1/projections/rebuild")
    assert r.status_code == 200 and r.json()["projected"] > 0
    hist = (await http.get(f"/api/v1/agents/{agent_id}/chats/rb/messages")).json()
    assert hist[0]["text"] == "keep me" and len(hist) == 2


async def _history_len(http: httpx.AsyncClient, agent_id: str, chat: str, n: int) -> bool:
    return len((await http.get(f"/api/v1/agents/{agent_id}/chats/{chat}/messages")).json()) == n


def test_ray_is_sized_for_the_machine(system: System) -> None:
    assert ray.cluster_resources()["CPU"] == system.settings.num_cpus
