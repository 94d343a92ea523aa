"""Postgres stopped and started again under a running system (kept last: it takes the database away)."""

from __future__ import annotations

import asyncio

import httpx
import ray

from cluster.bootstrap import System
from tests.conftest import eventually, new_agent


async def test_database_outage_gives_503_loses_nothing_and_recovers(system: System, http: httpx.AsyncClient) -> None:
    assert system.embedded is not None
    agent_id = await new_agent(http)
    acked = []
    for i in range(3):
        r = await http.post(f"/api/v1/agents/{agent_id}/messages", json={"text": f"before {i}", "chat_id": "db"})
        assert r.status_code == 200
        acked.append(r.json()["event_id"])
    runner = ray.get_actor(f"agent:{agent_id}", namespace=system.settings.ray_namespace)
    pid = (await runner.ping.remote())["pid"]

    await asyncio.to_thread(system.embedded.stop)
    try:
        assert not system.embedded.running(), "the database still runs after its stop"
        r = await http.get(f"/api/v1/agents/{agent_id}")
        assert r.status_code == 503 and "event store unavailable" in r.json()["detail"]
        assert "outcome" not in r.json()["detail"]  # a read: no write whose outcome could be unknown
        assert str(system.embedded.port) not in r.json()["detail"]  # the kind of failure, not the server's address
        assert r.headers["retry-after"] == "1"
        r = await http.post(f"/api/v1/agents/{agent_id}/messages", json={"text": "during", "chat_id": "db"})
        assert r.status_code == 503 and "outcome is unknown" in r.json()["detail"]
        health = await http.get("/healthz")
        assert health.status_code == 503
        database = health.json()["checks"]["database"]
        assert database.startswith("event store unavailable (") and str(system.embedded.port) not in database
    finally:
        await asyncio.to_thread(system.embedded.start)

    async def api_back() -> bool:
        return (await http.get(f"/api/v1/agents/{agent_id}")).status_code == 200

    await eventually(api_back, what="the API to recover")
    r = await http.post(
        f"/api/v1/agents/{agent_id}/messages", json={"text": "after", "chat_id": "db"}, params={"timeout": 60}
    )
    assert r.status_code == 200 and r.json()["response"].endswith("turn 4: you said 'after'")
    assert (await runner.ping.remote())["pid"] == pid  # recovered without restarting the agent
    events = (await http.get("/api/v1/events", params={"stream": f"chat-{agent_id}/db"})).json()
    ids = {e["id"] for e in events if e["type"] == "chat.message_received"}
    assert set(acked) <= ids and len(ids) == 4  # every acknowledged message kept, the refused one absent
    assert (await http.get("/healthz")).status_code == 200
