"""A chat's folded state: the history an LLM request carries, its bound, and a snapshot that keeps it; and the
replay of a chat's decisions from its log."""

from __future__ import annotations

from typing import Any

import pytest

from actors.agents.conversation import HISTORY_TURNS, ChatState, Conversation
from actors.agents.replay import ReplayReport, replay_agent, replay_chat
from actors.agents.runner import AgentRunnerImpl
from actors.config import RuntimeConfig
from actors.entity import EntityHost
from actors.llm.budget import spent_usd
from actors.llm.cache import CompletionCache
from actors.llm.providers import Completion, CompletionRequest, ScriptedProvider, ScriptRule, completed_event
from actors.llm.router import LLMRouter, RetryPolicy
from actors.subscriber import EntityActor
from events import Meta, NewEvent, RecordedEvent
from events.hub import AgentCreated, AgentSettings, AgentUpdated, MessageReceived, ReplyFailed, ReplySent
from storage.eventlog import EventLog


def recorded(type_: str, version: int, **data: Any) -> RecordedEvent:
    new = NewEvent(type=type_, data={"agent_id": "a1", "chat_id": "c1", **data})
    return new.recorded("chat-a1/c1", version, version, tx_id=1)


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


# ---- replay: a chat's decisions re-run against its log, with no provider ----


class ChatLog:
    """A chat stream built by hand as the runner would have written it."""

    def __init__(self) -> None:
        self.events: list[RecordedEvent] = []
        self.position = 100

    def add(self, type_: str, data: dict[str, Any], cause: RecordedEvent | None = None) -> RecordedEvent:
        self.position += 1
        new = NewEvent(type=type_, data=data, meta=Meta(causation_id=cause.id if cause else None))
        e = new.recorded("chat-a1/c1", len(self.events) + 1, self.position, tx_id=1)
        self.events.append(e)
        return e

    def message(self, text: str) -> RecordedEvent:
        return self.add("chat.message_received", {"agent_id": "a1", "chat_id": "c1", "text": text, "channel": "api"})

    def answer(self, message: RecordedEvent, seen: ChatState, settings: AgentSettings, text: str) -> None:
        """Record the completion and reply for ``message`` as decided on the state ``seen``."""
        request = Conversation(lambda: settings, never_called).request_for(seen, message, settings)
        c = Completion(
            text=text, provider="scripted", model="scripted", prompt_tokens=3, completion_tokens=1, latency_ms=1
        )
        self.add("llm.completed", completed_event(c, request, "a1").model_dump(mode="json"), message)
        self.add("chat.reply_sent", {"agent_id": "a1", "chat_id": "c1", "response": text, "channel": "api"}, message)

    def state(self) -> ChatState:
        conv = Conversation(AgentSettings, never_called)
        state = conv.initial()
        for e in self.events:
            state = conv.evolve(state, e)
        return state


async def test_replay_verifies_a_recorded_failure() -> None:
    """A ``chat.reply_failed`` (provider down, budget spent) was a valid decision, not a mismatch."""
    log = ChatLog()
    m = log.message("anyone?")
    log.add("chat.reply_failed", {"agent_id": "a1", "chat_id": "c1", "error": "openai: HTTP 503 down"}, m)
    m2 = log.message("still there?")
    error = "agent budget exceeded: spent $0.0100 of $0.0100"
    log.add("chat.reply_failed", {"agent_id": "a1", "chat_id": "c1", "error": error, "budget_exceeded": True}, m2)
    m3 = log.message("hello")
    log.answer(m3, log.state(), AgentSettings(), "hi there")
    report = ReplayReport()
    await replay_chat(Conversation(AgentSettings, never_called), log.events, report)
    assert report.mismatches == [] and report.messages == 3 and report.verified_replies == 1
    assert report.completions_from_log == 1


async def test_replay_of_a_long_chat_where_a_message_came_before_the_previous_reply() -> None:
    """Live, the second message was folded in before the first was answered (its append lost to a conflict), so
    the history trimmed to the last turns started one turn later than replay's fold up to the message gives."""
    log = ChatLog()
    settings = AgentSettings()
    for i in range(HISTORY_TURNS):
        m = log.message(f"q{i}")
        log.answer(m, log.state(), settings, f"a{i}")
    first = log.message("first")
    second = log.message("second")
    log.answer(first, log.state(), settings, "to the first")  # decided with "second" already folded in
    log.answer(second, log.state(), settings, "to the second")
    report = ReplayReport()
    await replay_chat(Conversation(lambda: settings, never_called), log.events, report)
    assert report.mismatches == [] and report.verified_replies == HISTORY_TURNS + 2


async def test_replay_uses_the_settings_as_of_each_message(eventlog: EventLog) -> None:
    """A PATCH of the system prompt, model or temperature applies from then on, not to earlier messages."""
    v1 = AgentSettings(system_prompt="v1")
    v2 = AgentSettings(system_prompt="v2", model_id="gpt-4o-mini", temperature=0.1)
    await eventlog.append("agent-a1", [NewEvent.of(AgentCreated(agent_id="a1", name="a", settings=v1))])
    conv = Conversation(lambda: v1, never_called)

    async def exchange(text: str, settings: AgentSettings) -> None:
        await eventlog.append("chat-a1/c1", [NewEvent.of(MessageReceived(agent_id="a1", text=text, chat_id="c1"))])
        events = await eventlog.read_stream("chat-a1/c1")
        state = conv.initial()
        for e in events:
            state = conv.evolve(state, e)
        request = conv.request_for(state, events[-1], settings)
        c = Completion(
            text=f"re {text}", provider="scripted", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1
        )
        answer = [
            NewEvent.of(completed_event(c, request, "a1")),
            NewEvent.of(ReplySent(agent_id="a1", chat_id="c1", response=c.text, channel="api")),
        ]
        for n in answer:
            n.meta.causation_id = events[-1].id
        await eventlog.append("chat-a1/c1", answer)

    await exchange("before the change", v1)
    await eventlog.append("agent-a1", [NewEvent.of(AgentUpdated(settings=v2))])
    await exchange("after the change", v2)
    report = await replay_agent(eventlog, "a1")
    assert report.mismatches == [] and report.verified_replies == 2 and report.completions_from_log == 2


async def test_a_reply_the_log_refuses_is_answered_as_failed_and_replays(eventlog: EventLog) -> None:
    """A model's text with a NUL character, or one over the event size limit (4,096 bytes here), cannot be
    recorded: the message gets a ``chat.reply_failed`` with the reason instead of no answer at all."""
    texts = iter(["ok\x00 then", "x" * 5000, "fine"])

    async def model(request: CompletionRequest) -> Completion:
        text = next(texts)
        return Completion(text=text, provider="scripted", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1)

    host = EntityHost(Conversation(AgentSettings, model), eventlog)
    for i in range(3):
        await eventlog.append("chat-a1/c1", [NewEvent.of(MessageReceived(agent_id="a1", text=f"q{i}", chat_id="c1"))])
        await host.handle((await eventlog.read_stream("chat-a1/c1"))[-1])
    events = await eventlog.read_stream("chat-a1/c1")
    messages = [e for e in events if e.type == "chat.message_received"]
    answers = [(e.type, e.meta.causation_id) for e in events if e.type != "chat.message_received"]
    assert answers == [
        ("llm.completed", messages[0].id),
        ("chat.reply_failed", messages[0].id),
        ("llm.completed", messages[1].id),
        ("chat.reply_failed", messages[1].id),
        ("llm.completed", messages[2].id),
        ("chat.reply_sent", messages[2].id),
    ]
    assert [e.data["text"] for e in events if e.type == "llm.completed"] == ["", "", "fine"]
    errors = [e.data["error"] for e in events if e.type == "chat.reply_failed"]
    assert errors[0].startswith("the reply could not be recorded: ") and "NUL" in errors[0]
    assert "4096" in errors[1]
    report = ReplayReport()
    await replay_chat(Conversation(AgentSettings, never_called), events, report)
    assert report.mismatches == [] and report.verified_replies == 1 and report.completions_from_log == 3


async def test_a_refused_reply_keeps_its_cost(eventlog: EventLog) -> None:
    """The provider was paid for a reply the log refused: its completion is recorded without the text, so the
    agent's budget (summed from the log when its runner starts) counts it, and replay reads it back."""
    rules = [ScriptRule(pattern="essay", text="word " * 1000)]  # over the log's 4,096 bytes
    router = LLMRouter({"scripted": ScriptedProvider(rules)}, RetryPolicy(max_attempts=1))
    paid: list[Completion] = []

    async def complete(request: CompletionRequest) -> Completion:
        paid.append(await router.complete(request))
        return paid[-1]

    settings = AgentSettings(model_id="gpt-4o-mini")
    await eventlog.append("agent-a1", [NewEvent.of(AgentCreated(agent_id="a1", name="a", settings=settings))])
    host = EntityHost(Conversation(lambda: settings, complete), eventlog)
    await eventlog.append("chat-a1/c1", [NewEvent.of(MessageReceived(agent_id="a1", text="an essay", chat_id="c1"))])
    await host.handle((await eventlog.read_stream("chat-a1/c1"))[-1])
    events = await eventlog.read_stream("chat-a1/c1")
    assert [e.type for e in events] == ["chat.message_received", "llm.completed", "chat.reply_failed"]
    (c,) = paid
    assert c.cost_usd > 0 and await spent_usd(eventlog, "agent_id", "a1") == pytest.approx(c.cost_usd)
    assert events[1].data["completion_tokens"] == c.completion_tokens == 1000
    report = await replay_agent(eventlog, "a1")
    assert report.mismatches == [] and report.messages == 1 and report.completions_from_log == 1


async def test_replay_counts_a_message_with_nothing_recorded_as_unanswered() -> None:
    """A message still being answered, or left when the agent stopped, diverged from nothing: no mismatch."""
    log = ChatLog()
    m = log.message("hello")
    log.answer(m, log.state(), AgentSettings(), "hi there")
    log.message("are you there?")
    report = ReplayReport()
    await replay_chat(Conversation(AgentSettings, never_called), log.events, report)
    assert report.mismatches == [] and report.messages == 2 and report.unanswered == 1
    assert report.verified_replies == 1


def test_a_message_trimmed_out_of_the_history_is_still_the_one_asked() -> None:
    """More than the history's bound of turns folded in while a message's reply was decided (a burst of messages
    after a conflict): the request still ends with that message, not with the newest one."""
    conv, state, _ = chat(0)
    first = recorded("chat.message_received", 1, text="the first", channel="api")
    state = conv.evolve(state, first)
    for i in range(2 * HISTORY_TURNS):
        state = conv.evolve(state, recorded("chat.message_received", i + 2, text=f"q{i}", channel="api"))
    asked = conv.request_for(state, first, AgentSettings()).messages
    assert (asked[-1].role, asked[-1].content) == ("user", "the first")
    assert [m.content for m in asked[1:-1]] == [f"q{i}" for i in range(2 * HISTORY_TURNS)]


async def test_replay_of_a_message_answered_after_it_was_trimmed_out() -> None:
    log = ChatLog()
    settings = AgentSettings()
    first = log.message("the first")
    for i in range(2 * HISTORY_TURNS):
        log.message(f"q{i}")
    log.answer(first, log.state(), settings, "to the first")  # decided with every later message folded in
    report = ReplayReport()
    await replay_chat(Conversation(lambda: settings, never_called), log.events, report)
    assert report.mismatches == [] and report.verified_replies == 1
    assert report.unanswered == 2 * HISTORY_TURNS


async def test_replay_of_an_agent_reads_its_own_chats_only(eventlog: EventLog) -> None:
    """``_`` is a character of agent ids and LIKE's any-character: ``a_1``'s chats are not ``ab1``'s."""
    for agent in ("a_1", "ab1"):
        stream = f"chat-{agent}/c"
        await eventlog.append(stream, [NewEvent.of(MessageReceived(agent_id=agent, text="hi", chat_id="c"))])
        (message,) = await eventlog.read_stream(stream)
        failed = NewEvent.of(ReplyFailed(agent_id=agent, chat_id="c", error="down"), causation_id=message.id)
        await eventlog.append(stream, [failed])
    report = await replay_agent(eventlog, "a_1")
    assert report.mismatches == [] and report.streams == 1 and report.messages == 1


async def test_a_message_whose_handling_fails_unexpectedly_is_answered_as_failed(
    eventlog: EventLog, db_url: str
) -> None:
    """Not skipped in silence: the client, told with a 202 that the reply would arrive, waited for ever."""

    async def broken(request: CompletionRequest) -> Completion:
        raise RuntimeError("a bug, with the database at 10.0.0.5:5432 in its text")

    class Chats(EntityActor):
        async def setup(self) -> None:
            self.hosts["chat"] = EntityHost(Conversation(AgentSettings, broken), self.store)

    actor = Chats(RuntimeConfig(database_url=db_url), "chats")
    try:
        await eventlog.append("chat-a1/c1", [NewEvent.of(MessageReceived(agent_id="a1", text="hi", chat_id="c1"))])
        (message,) = await eventlog.read_stream("chat-a1/c1")
        await actor.deliver([message], message.cursor)  # the delivery succeeds: the orchestrator moves on
        await actor.deliver([message], message.cursor)  # delivered again: answered once
        answers = (await eventlog.read_stream("chat-a1/c1"))[1:]
        assert [(e.type, e.meta.causation_id) for e in answers] == [("chat.reply_failed", message.id)]
        assert answers[0].data["error"] == "the reply failed: internal error (RuntimeError)"
        assert actor.failures == 1
    finally:
        await actor.store.close()


async def test_a_reply_whose_recording_crashes_keeps_what_its_completion_cost(eventlog: EventLog, db_url: str) -> None:
    """The answer was paid for, then its append kept failing on something no outage explains: the chat answers the
    message as failed and keeps the completion without its text, so the agent's spend counts it (it recorded the
    failure alone), and a replay of the chat reads it as it reads a refused reply."""
    calls: list[str] = []

    async def paid(request: CompletionRequest) -> Completion:
        calls.append(request.last_user_message())
        tokens = {"prompt_tokens": 40_000, "completion_tokens": 10_000, "cost_usd": 0.012}
        return Completion(text="the answer", provider="openai", model="gpt-4o-mini", latency_ms=1, **tokens)

    class BrokenReplies:
        """The log, except that appending a reply raises what no outage explains."""

        def __init__(self, store: EventLog) -> None:
            self.store = store

        def __getattr__(self, name: str) -> Any:
            return getattr(self.store, name)

        async def append(self, stream: str, events: list[NewEvent], *args: Any, **kw: Any) -> Any:
            if any(e.type == "chat.reply_sent" for e in events):
                raise RuntimeError("a bug in the reply's recording")
            return await self.store.append(stream, events, *args, **kw)

    class Chats(EntityActor):
        async def setup(self) -> None:
            self.hosts["chat"] = EntityHost(Conversation(AgentSettings, paid), BrokenReplies(self.store))  # type: ignore[arg-type]

    actor = Chats(RuntimeConfig(database_url=db_url), "chats")
    try:
        await eventlog.append("chat-a1/c1", [NewEvent.of(MessageReceived(agent_id="a1", text="hi", chat_id="c1"))])
        (message,) = await eventlog.read_stream("chat-a1/c1")
        await actor.deliver([message], message.cursor)
        answers = (await eventlog.read_stream("chat-a1/c1"))[1:]
        assert [(e.type, e.meta.causation_id) for e in answers] == [
            ("llm.completed", message.id),
            ("chat.reply_failed", message.id),
        ]
        assert answers[0].data["text"] == "" and answers[0].data["total_tokens"] == 50_000 and calls == ["hi"]
        assert answers[1].data["error"] == "the reply failed: internal error (RuntimeError)"
        assert await spent_usd(eventlog, "agent_id", "a1") == pytest.approx(0.012)
        report = ReplayReport()
        await replay_chat(Conversation(AgentSettings, never_called), await eventlog.read_stream("chat-a1/c1"), report)
        assert report.mismatches == [] and report.completions_from_log == 1
    finally:
        await actor.store.close()


async def test_an_answer_that_spent_the_budget_is_still_given_when_the_chat_decides_again(eventlog: EventLog) -> None:
    """The user's next message lands while the reply is asked for: the reply's append conflicts and the chat
    decides again. The answer was paid for and spent the budget; asked again it came from the cache, but the budget
    check came first: a 402 for an answer already bought, and its cost never recorded."""
    calls: list[str] = []

    class PaidModel:
        name = "openai"

        async def complete(self, request: CompletionRequest) -> Completion:
            calls.append(request.last_user_message())
            if len(calls) == 1:  # the next message arrives during this call
                await eventlog.append(
                    "chat-a1/c1", [NewEvent.of(MessageReceived(agent_id="a1", text="and?", chat_id="c1"))]
                )
            tokens = {"prompt_tokens": 50_000, "completion_tokens": 50_000}  # enough to cost over $0.01
            return Completion(text="answer", provider="openai", model="gpt-4o-mini", latency_ms=1, **tokens)

    runner = object.__new__(AgentRunnerImpl)
    runner.settings = AgentSettings(provider="openai", model_id="gpt-4o-mini", budget_usd=0.01)
    runner.spent = 0.0
    runner.router = LLMRouter({"openai": PaidModel()}, RetryPolicy(max_attempts=1), CompletionCache(ttl_s=60))
    host = EntityHost(Conversation(lambda: runner.settings, runner._complete), eventlog)
    await eventlog.append("chat-a1/c1", [NewEvent.of(MessageReceived(agent_id="a1", text="hi", chat_id="c1"))])
    (first,) = await eventlog.read_stream("chat-a1/c1")
    await host.handle(first)
    answers = [e for e in await eventlog.read_stream("chat-a1/c1") if e.meta.causation_id == first.id]
    assert [e.type for e in answers] == ["llm.completed", "chat.reply_sent"] and calls == ["hi"]
    paid = answers[0].data["cost_usd"]
    assert paid >= 0.01 and await spent_usd(eventlog, "agent_id", "a1") == pytest.approx(paid)
    second = (await eventlog.read_stream("chat-a1/c1"))[1]
    await host.handle(second)  # the budget is spent now: this one is refused
    (refused,) = [e for e in await eventlog.read_stream("chat-a1/c1") if e.meta.causation_id == second.id]
    assert refused.type == "chat.reply_failed" and refused.data["budget_exceeded"]
