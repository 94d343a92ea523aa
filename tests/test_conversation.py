"""A chat's folded state: the history an LLM request carries, its bound, and a snapshot that keeps it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

from actors.agents.conversation import HISTORY_TURNS, ChatState, Conversation
from actors.llm.providers import Completion, CompletionRequest
from events import Meta, RecordedEvent
from events.hub import AgentSettings


def recorded(type_: str, version: int, **data: Any) -> RecordedEvent:
    return RecordedEvent(
        id=uuid4(),
        stream="chat-a1/c1",
        version=version,
        position=version,
        tx_id=1,
        type=type_,
        data={"agent_id": "a1", "chat_id": "c1", **data},
        meta=Meta(),
        recorded_at=datetime.now(UTC),
    )


async def never_called(request: CompletionRequest) -> Completion:
    raise AssertionError("no completion is needed to build a request")


def chat(exchanges: int) -> tuple[Conversation, ChatState, list[RecordedEvent]]:
    conv = Conversation(AgentSettings, never_called)
    state, events = conv.initial(), []
    for i in range(exchanges):
        events.append(recorded("chat.message_received", 2 * i + 1, text=f"q{i}", channel="api"))
        events.append(recorded("chat.reply_sent", 2 * i + 2, response=f"a{i}", channel="api"))
    for e in events:
        state = conv.evolve(state, e)
    return conv, state, events


def contents(request: CompletionRequest) -> list[str]:
    return [m.content for m in request.messages]


def test_request_carries_the_system_prompt_and_every_turn_up_to_the_message() -> None:
    conv, state, events = chat(3)
    settings = AgentSettings(system_prompt="be brief")
    assert contents(conv.request_for(state, events[4], settings)) == ["be brief", "q0", "a0", "q1", "a1", "q2"]
    # a redelivered earlier message is asked with the history it had, not with the turns folded in after it
    assert contents(conv.request_for(state, events[2], settings)) == ["be brief", "q0", "a0", "q1"]
    assert [m.role for m in conv.request_for(state, events[2], settings).messages] == [
        "system",
        "user",
        "assistant",
        "user",
    ]


def test_history_keeps_the_last_exchanges_only() -> None:
    conv, state, events = chat(HISTORY_TURNS + 5)
    assert len(state.turns) == 2 * HISTORY_TURNS
    asked = contents(conv.request_for(state, events[-2], AgentSettings()))
    assert asked[1] == "q5" and asked[-1] == f"q{HISTORY_TURNS + 4}"
    assert len(asked) == 1 + 2 * HISTORY_TURNS - 1


def test_a_snapshot_restores_the_history_a_request_carries() -> None:
    conv, state, events = chat(2)
    restored = conv.from_snapshot(conv.to_snapshot(state))
    settings = AgentSettings()
    assert contents(conv.request_for(restored, events[2], settings)) == contents(
        conv.request_for(state, events[2], settings)
    )
    later = recorded("chat.message_received", 5, text="q2", channel="api")
    restored = conv.evolve(restored, later)
    assert contents(conv.request_for(restored, later, settings))[-3:] == ["q1", "a1", "q2"]
