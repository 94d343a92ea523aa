"""``agenthub demo``: the whole agent hub in one run, over real HTTP, on the embedded defaults."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import ray
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from actors.agents.replay import replay_agent
from cluster.bootstrap import down, up
from cluster.settings import Settings
from storage.eventlog import EventLog

CHATS = {
    "alice": ["Hi, I need a car for Friday", "A convertible, please", "How much is it?"],
    "bob": ["Where is my invoice?", "Thanks!"],
}


def _provider_calls(http: httpx.Client) -> float:
    """Calls that reached any LLM provider, summed over every actor's registry on ``/metrics``."""
    page = http.get("/metrics").text
    families = text_string_to_metric_families(page)
    return sum(s.value for f in families for s in f.samples if s.name == "agenthub_llm_provider_calls_total")


def _wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


RESTART_REPLY_TIMEOUT_S = 120.0


def _reply_text(http: httpx.Client, agent_id: str, chat: str, r: httpx.Response, timeout: float = 120.0) -> str:
    """The reply to a message: from the response, or, after a 202 (the reply had not come in time), from the log."""
    r.raise_for_status()
    if r.status_code != 202:
        return r.json()["response"]
    message_id = r.json()["event_id"]
    found: list[dict[str, Any]] = []

    def replied() -> bool:
        events = http.get(
            "/api/v1/events",
            params={
                "stream": f"chat-{agent_id}/{chat}",
                "type": ["chat.reply_sent", "chat.reply_failed"],
                "limit": 1000,
            },
        )
        events.raise_for_status()
        found.extend(e for e in events.json() if e["meta"].get("causation_id") == message_id)
        return bool(found)

    _wait_for(replied, timeout, what=f"the reply to message {message_id}")
    reply = found[0]
    if reply["type"] != "chat.reply_sent":
        raise RuntimeError(f"the agent failed to reply: {reply['data'].get('error')}")
    return reply["data"]["response"]


def _completions(usage: dict[str, Any]) -> int:
    return sum(m["calls"] for m in usage["models"])


def run_demo(settings: Settings, console: Console) -> int:
    with console.status("starting Postgres, Ray, the orchestrator and Ray Serve…"):
        system = up(settings)
    console.print(f"[green]up[/]: API {system.api_url}, Ray dashboard {system.dashboard_url}")
    try:
        return _converse(system, console)
    finally:
        console.print(down(system))


def _converse(system, console: Console) -> int:
    http = httpx.Client(base_url=system.api_url, headers={"Authorization": f"Bearer {system.api_token}"}, timeout=60)
    agent = (
        http.post(
            "/api/v1/agents",
            json={
                "name": "Rental desk",
                "settings": {
                    "system_prompt": "You are the rental desk assistant.",
                    "provider": "scripted",
                    "model_id": "scripted-1",
                    "temperature": 0,
                },
            },
        )
        .raise_for_status()
        .json()
    )
    aid = agent["id"]
    http.post(f"/api/v1/agents/{aid}/start").raise_for_status()
    console.print(f"agent [bold]{aid}[/] created on the scripted provider and started")

    table = Table("chat", "message", "reply", "ms")
    for chat, texts in CHATS.items():
        for text in texts:
            t = time.perf_counter()
            r = http.post(
                f"/api/v1/agents/{aid}/messages",
                json={"text": text, "chat_id": chat, "platform_user_id": chat, "channel": "api"},
            )
            response = _reply_text(http, aid, chat, r)
            table.add_row(chat, text, escape(response), f"{(time.perf_counter() - t) * 1000:.0f}")
    console.print(table)

    sent = sum(len(texts) for texts in CHATS.values())
    # the usage projection follows the log a moment behind the replies: read it as of the last one
    usage = http.get(f"/api/v1/agents/{aid}/usage", params={"fresh": "true"}).raise_for_status().json()
    if _completions(usage) < sent:
        raise RuntimeError(f"token usage counts {_completions(usage)} completions for {sent} replies")
    console.print(f"token usage: {usage['total_tokens']} tokens over {_completions(usage)} completions")

    runner = ray.get_actor(f"agent:{aid}", namespace=system.settings.ray_namespace)
    before = ray.get(runner.ping.remote())
    console.print(f"[yellow]killing the agent actor[/] agent:{aid} (pid {before['pid']})")
    ray.kill(runner, no_restart=True)
    # the orchestrator restarts the runner first (it may take a while on a busy machine): wait long for the reply,
    # and if the ingress still answers 202, read the reply from the log once it arrives
    r = http.post(
        f"/api/v1/agents/{aid}/messages",
        params={"timeout": RESTART_REPLY_TIMEOUT_S},
        json={"text": "Are you still there?", "chat_id": "alice"},
        timeout=RESTART_REPLY_TIMEOUT_S + 30,
    )
    response = _reply_text(http, aid, "alice", r)
    console.print(f"after the kill, alice gets: [bold]{escape(response)}[/]  (turn 4: history came from the log)")
    after = ray.get(ray.get_actor(f"agent:{aid}", namespace=system.settings.ray_namespace).ping.remote())
    status = http.get(f"/api/v1/agents/{aid}").json()
    console.print(
        f"agent restarted by the orchestrator: new pid {after['pid']}, status {status['status']}, "
        f"restarts {status['restarts']}"
    )

    calls_before = _provider_calls(http)

    async def do_replay():
        store = await EventLog.connect(system.database_url, run_migrations=False)
        try:
            return await replay_agent(store, aid)
        finally:
            await store.close()

    report = asyncio.run(do_replay())
    calls_after = _provider_calls(http)
    console.print(
        f"replay from the log: {report.streams} chats, {report.messages} messages, {report.verified_replies} "
        f"replies re-derived and matching, {len(report.mismatches)} mismatches, "
        f"provider calls during replay: {calls_after - calls_before:g} "
        f"(the restarted agent's replies made {calls_before:g})"
    )
    ok = not report.mismatches and calls_after == calls_before > 0 and report.verified_replies == 6
    console.print("[bold green]demo complete[/]" if ok else "[bold red]demo found a problem[/]")
    return 0 if ok else 1
