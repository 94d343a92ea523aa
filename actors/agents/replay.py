"""Replay a chat by re-running the agent's decisions against the log, with no provider at all.

Completions are served from the recorded ``llm.completed`` events, matched by the hash of the request the
replayed decision makes; a decision that asks something different, or emits a different reply, is reported as
a mismatch. This proves the recorded run can be rebuilt and resumed without calling an LLM."""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.agents.agent import agent_stream, fold_agent
from actors.agents.conversation import ChatState, Conversation
from actors.entity import Context
from actors.llm.providers import Completion, CompletionRequest
from events import NewEvent, RecordedEvent
from storage.eventlog import EventLog


class NotRecorded(LookupError):
    """The replayed decision asked for a completion the log does not hold."""


@dataclass
class ReplayReport:
    streams: int = 0
    events: int = 0
    messages: int = 0
    verified_replies: int = 0
    mismatches: list[str] = field(default_factory=list)
    completions_from_log: int = 0


def _recorded_completions(events: list[RecordedEvent]) -> dict[str, Completion]:
    return {
        e.data["request_hash"]: Completion(
            text=e.data["text"],
            provider=e.data["provider"],
            model=e.data["model"],
            prompt_tokens=e.data["prompt_tokens"],
            completion_tokens=e.data["completion_tokens"],
            latency_ms=e.data["latency_ms"],
            cost_usd=e.data["cost_usd"],
        )
        for e in events
        if e.type == "llm.completed"
    }


async def replay_chat(conv: Conversation, events: list[RecordedEvent], report: ReplayReport) -> ChatState:
    completions = _recorded_completions(events)

    async def from_log(request: CompletionRequest) -> Completion:
        try:
            found = completions[request.digest()]
        except KeyError:
            raise NotRecorded(f"no recorded completion for request {request.digest()}") from None
        report.completions_from_log += 1
        return found

    conv.complete = from_log
    by_cause: dict[str, list[RecordedEvent]] = {}
    for e in events:
        if e.meta.causation_id is not None:
            by_cause.setdefault(str(e.meta.causation_id), []).append(e)
    state = conv.initial()
    ctx = Context(stream=events[0].stream if events else "")
    for e in events:
        state = conv.evolve(state, e)
        report.events += 1
        if e.type != "chat.message_received":
            continue
        report.messages += 1
        recorded = by_cause.get(str(e.id), [])
        replay_state = state.model_copy(deep=True)
        replay_ctx = Context(stream=ctx.stream)
        produced: list[NewEvent] = []
        try:
            for _ in range(4):
                new = await conv.decide(replay_state, e, replay_ctx)
                if not new:
                    break
                for n in new:
                    rec = RecordedEvent(
                        id=n.id,
                        stream=ctx.stream,
                        version=0,
                        position=0,
                        tx_id=0,
                        type=n.type,
                        data=n.data,
                        meta=n.meta.model_copy(update={"causation_id": e.id}),
                        recorded_at=n.meta.occurred_at,
                    )
                    replay_state = conv.evolve(replay_state, rec)
                    replay_ctx.caused.setdefault(str(e.id), []).append(n.type)
                    produced.append(n)
        except NotRecorded as err:
            report.mismatches.append(f"{e.stream}@{e.version}: {err}")
            continue
        want = [(r.type, r.data.get("response", r.data.get("text"))) for r in recorded]
        got = [(p.type, p.data.get("response", p.data.get("text"))) for p in produced]
        if want == got:
            report.verified_replies += sum(1 for t, _ in got if t == "chat.reply_sent")
        else:
            report.mismatches.append(f"{e.stream}@{e.version}: recorded {want}, replayed {got}")
    return state


async def replay_agent(store: EventLog, agent_id: str) -> ReplayReport:
    """Replay every chat of an agent from the log."""
    agent = fold_agent(await store.read_stream(agent_stream(agent_id)))
    report = ReplayReport()
    rows = await store.fetch("SELECT stream FROM streams WHERE stream LIKE $1 ORDER BY stream", f"chat-{agent_id}/%")
    streams = [r[0] for r in rows]
    for stream in streams:
        conv = Conversation(lambda: agent.settings, _no_provider)
        await replay_chat(conv, await store.read_stream(stream), report)
        report.streams += 1
    return report


async def _no_provider(request: CompletionRequest) -> Completion:
    raise NotRecorded("replay never calls a provider")
