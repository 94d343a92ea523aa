"""What crosses Ray as JSON (events/pickling.py) comes back equal, extras and ids included."""

from __future__ import annotations

import pickle

import ray.cloudpickle

from actors.llm.base import ChatMessage, Completion, CompletionRequest
from events import NewEvent
from storage.eventlog import EventLog


async def test_recorded_events_survive_ray_pickling(eventlog: EventLog) -> None:
    event = NewEvent(type="agent.updated", data={"settings": {"temperature": 0.25, "integrations": []}})
    event.meta.actor = "api"
    event.meta.custom_tag = {"k": "v"}  # type: ignore[attr-defined]  # Meta allows extra fields
    await eventlog.append("agent-pickle", [event])
    (recorded,) = await eventlog.read_stream("agent-pickle")
    back = ray.cloudpickle.loads(ray.cloudpickle.dumps([recorded]))[0]
    assert back == recorded and back.meta.custom_tag == {"k": "v"}
    assert back.recorded_at == recorded.recorded_at and back.recorded_at.tzinfo is not None
    assert pickle.loads(pickle.dumps(event)) == event


def test_completion_requests_keep_their_digest_across_pickling() -> None:
    request = CompletionRequest(
        provider="scripted",
        model="m",
        messages=[ChatMessage(role="user", content=f"turn {i}") for i in range(80)],
        temperature=0.3,
        response_schema={"type": "object"},
        agent_id="a",
    )
    back = pickle.loads(pickle.dumps(request))
    assert back == request and back.digest() == request.digest()
    completion = Completion(text="t", provider="p", model="m", prompt_tokens=1, completion_tokens=2, latency_ms=0.123)
    assert pickle.loads(pickle.dumps(completion)) == completion
