"""Replay a chat by re-running the agent's decisions against the log, with no provider at all.

Completions are served from the recorded ``llm.completed`` events, matched by the hash of the request the
replayed decision makes; a decision that asks something different, or emits a different reply, is reported as
a mismatch. This proves the recorded run can be rebuilt and resumed without calling an LLM.

A replayed decision is made as the live one was:

* with the agent's settings as of the message (a later PATCH of its prompt or model does not apply to earlier
  messages). The runner reloads its settings shortly after a change, so a message right at a change may have been
  answered with the settings just before or after it: those are tried next.
* where the live decision saw turns folded in after the message (a message that arrived before the previous
  reply was recorded, in a chat long enough to be trimmed), its history was trimmed further: the events between
  the message and its reply are folded in one by one until the recorded request matches.
* a recorded ``chat.reply_failed`` (the provider failed, the budget was spent) is replayed as that failure; one
  recorded with the completion whose reply the log refused (``Conversation.refused``) is replayed from that
  completion and refused the same way.
* a message with nothing recorded for it (its reply was still being decided, or the agent stopped first) is
  counted as unanswered: there is nothing to compare, so it is no mismatch."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from actors.agents.agent import AgentState, agent_stream, evolve_agent
from actors.agents.conversation import ChatState, Conversation, chat_stream, refusal
from actors.entity import Context
from actors.llm.budget import BudgetExceededError
from actors.llm.providers import Completion, CompletionRequest, ProviderError
from events import NewEvent, RecordedEvent
from events.hub import AgentSettings
from storage.eventlog import EventLog

TURNS = ("chat.message_received", "chat.reply_sent")
SettingsAt = Callable[[int], Sequence[AgentSettings]]
"""The settings to try for a message at a log position, the likeliest first."""


class NotRecorded(LookupError):
    """The replayed decision asked for a completion the log does not hold."""


@dataclass
class ReplayReport:
    streams: int = 0
    events: int = 0
    messages: int = 0
    verified_replies: int = 0
    unanswered: int = 0
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


def _outcome(events: Sequence[RecordedEvent | NewEvent]) -> list[tuple[str, object]]:
    """What a decision did, as compared: each event's type and its text, reply or error."""
    out: list[tuple[str, object]] = []
    for e in events:
        d = e.data
        if e.type == "chat.reply_failed":
            out.append((e.type, (d.get("error"), bool(d.get("budget_exceeded")))))
        else:
            out.append((e.type, d.get("response", d.get("text"))))
    return out


def _as_recorded(n: NewEvent, stream: str, cause: RecordedEvent) -> RecordedEvent:
    caused = n.model_copy(update={"meta": n.meta.model_copy(update={"causation_id": cause.id})})
    return caused.recorded(stream, 0, 0)


async def _decide(conv: Conversation, state: ChatState, message: RecordedEvent) -> list[NewEvent]:
    """Run the conversation's decision for ``message`` to completion on a copy of ``state``."""
    state = state.model_copy(deep=True)
    ctx = Context(stream=message.stream)
    produced: list[NewEvent] = []
    for _ in range(4):
        new = await conv.decide(state, message, ctx)
        if not new:
            break
        for n in new:
            state = conv.evolve(state, _as_recorded(n, message.stream, message))
            ctx.note(str(message.id), n.type)
            produced.append(n)
    return produced


async def replay_chat(
    conv: Conversation, events: list[RecordedEvent], report: ReplayReport, settings_at: SettingsAt | None = None
) -> ChatState:
    """Replay one chat's stream. ``settings_at`` gives the agent's settings for a message's position (by default
    the conversation's own ``settings``)."""
    completions = _recorded_completions(events)
    failure: list[ProviderError] = []  # the recorded failure the message being replayed met, if any

    async def from_log(request: CompletionRequest) -> Completion:
        if failure:
            raise failure[0]
        try:
            found = completions[request.digest()]
        except KeyError:
            raise NotRecorded(f"no recorded completion for request {request.digest()}") from None
        report.completions_from_log += 1
        return found

    conv.complete = from_log
    own_settings = conv.settings
    by_cause: dict[str, list[RecordedEvent]] = {}
    for e in events:
        if e.meta.causation_id is not None:
            by_cause.setdefault(str(e.meta.causation_id), []).append(e)
    state = conv.initial()
    for i, e in enumerate(events):
        state = conv.evolve(state, e)
        report.events += 1
        if e.type != "chat.message_received":
            continue
        report.messages += 1
        recorded = by_cause.get(str(e.id), [])
        if not recorded:
            report.unanswered += 1
            continue
        failure.clear()
        failed = next((r for r in recorded if r.type == "chat.reply_failed"), None)
        refused: str | None = None  # why the log refused the reply, when it was recorded with its completion
        if failed is not None and any(r.type == "llm.completed" for r in recorded):
            refused = str(failed.data["error"])
        elif failed is not None:
            error = str(failed.data.get("error", ""))
            over = bool(failed.data.get("budget_exceeded"))
            failure.append(BudgetExceededError("agent", 0, 0, error) if over else ProviderError(error))
        # Turns the live decision may have had folded in after the message: those before its first effect.
        first_effect = min(r.version for r in recorded)
        later = [x for x in events[i + 1 :] if x.type in TURNS and x.version < first_effect]
        candidates = settings_at(e.position) if settings_at is not None else [own_settings()]
        produced: list[NewEvent] | None = None
        err: NotRecorded | None = None
        for settings in candidates:
            conv.settings = lambda settings=settings: settings
            seen = state
            for k in range(len(later) + 1):
                if k:
                    seen = conv.evolve(seen.model_copy(deep=True) if k == 1 else seen, later[k - 1])
                try:
                    produced = await _decide(conv, seen, e)
                    break
                except NotRecorded as nr:
                    err = err or nr
            if produced is not None:
                break
        conv.settings = own_settings
        if produced is None:
            report.mismatches.append(f"{e.stream}@{e.version}: {err}")
            continue
        if refused is not None:
            produced = refusal(e, produced, refused)
        want, got = _outcome(recorded), _outcome(produced)
        if want == got:
            report.verified_replies += sum(1 for t, _ in got if t == "chat.reply_sent")
        else:
            report.mismatches.append(f"{e.stream}@{e.version}: recorded {want}, replayed {got}")
    return state


def settings_history(agent_events: list[RecordedEvent]) -> SettingsAt:
    """The agent's settings as of each log position, folded from its stream: at a message's position, the settings
    then in force first, then the ones just before and just after (the runner reloads on a change, a moment later)."""
    state = AgentState()
    positions: list[int] = []
    versions: list[AgentSettings] = []
    for e in agent_events:
        before = state.settings
        state = evolve_agent(state, e)
        if not versions or state.settings != before:
            positions.append(e.position)
            versions.append(state.settings)

    def at(position: int) -> list[AgentSettings]:
        if not versions:
            return [AgentSettings()]
        i = max(0, bisect.bisect_right(positions, position) - 1)
        return [versions[j] for j in (i, i - 1, i + 1) if 0 <= j < len(versions)]

    return at


async def replay_agent(store: EventLog, agent_id: str) -> ReplayReport:
    """Replay every chat of an agent from the log."""
    settings_at = settings_history(await store.read_stream(agent_stream(agent_id)))
    report = ReplayReport()
    # starts_with, not LIKE: the ``_`` an agent id may hold is LIKE's any-character, so ``a_1`` took ``ab1``'s chats
    rows = await store.fetch(
        "SELECT stream FROM streams WHERE starts_with(stream, $1) ORDER BY stream", chat_stream(agent_id, "")
    )
    streams = [r[0] for r in rows]
    for stream in streams:
        conv = Conversation(lambda: settings_at(0)[0], _no_provider)
        await replay_chat(conv, await store.read_stream(stream), report, settings_at)
        report.streams += 1
    return report


async def _no_provider(request: CompletionRequest) -> Completion:
    raise NotRecorded("replay never calls a provider")
