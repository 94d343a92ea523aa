"""A chat between one agent and one chat id: the entity the agent runner hosts (stream ``chat-<agent>/<chat>``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, Field, PrivateAttr

from actors.entity import Context, Entity
from actors.llm.budget import BudgetExceededError, paid_without_text
from actors.llm.providers import ChatMessage, Completion, CompletionRequest, ProviderError, completed_event
from events import NewEvent, RecordedEvent
from events.hub import AgentSettings, ReplyFailed, ReplySent
from storage.errors import StoreError

HISTORY_TURNS = 40
Complete = Callable[[CompletionRequest], Awaitable[Completion]]


def chat_stream(agent_id: str, chat_id: str) -> str:
    return f"chat-{agent_id}/{chat_id}"


class Turn(BaseModel):
    id: str
    role: str
    text: str


class ChatState(BaseModel):
    turns: list[Turn] = Field(default_factory=list)
    messages: int = 0
    replies: int = 0
    # The turns as the LLM sees them, kept beside ``turns``: every reply resends the whole history, and building
    # it anew for each reply was the largest part of a runner's CPU per message.
    _history: list[ChatMessage] = PrivateAttr(default_factory=list)

    def model_post_init(self, context: Any) -> None:
        self._history = [ChatMessage(role=t.role, content=t.text) for t in self.turns]

    def add(self, turn: Turn) -> None:
        """Append a turn, keeping the last ``HISTORY_TURNS`` exchanges."""
        self.turns.append(turn)
        self._history.append(ChatMessage(role=turn.role, content=turn.text))
        excess = len(self.turns) - 2 * HISTORY_TURNS
        if excess > 0:
            del self.turns[:excess], self._history[:excess]

    def history_until(self, turn_id: str, text: str) -> list[ChatMessage]:
        """The history up to and including the user turn ``turn_id`` (saying ``text``): a redelivered message is
        asked with the history it first had, not with the turns folded in after it. A turn trimmed out by more than
        the bound's turns folded in after it (a burst of messages during its completion) is asked last, after the
        history kept: else the model would answer the newest message, recorded as this one's reply."""
        for i in range(len(self.turns) - 1, -1, -1):
            if self.turns[i].id == turn_id:
                return self._history[: i + 1]
        return [*self._history, ChatMessage(role="user", content=text)]


class Conversation(Entity[ChatState]):
    """Message → ``llm.completed`` + ``chat.reply_sent`` (or ``chat.reply_failed``)."""

    category = "chat"

    def __init__(self, settings: Callable[[], AgentSettings], complete: Complete) -> None:
        self.settings = settings
        self.complete = complete

    def initial(self) -> ChatState:
        return ChatState()

    def evolve(self, state: ChatState, event: RecordedEvent) -> ChatState:
        d = event.data
        if event.type == "chat.message_received":
            state.add(Turn(id=str(event.id), role="user", text=d["text"]))
            state.messages += 1
        elif event.type == "chat.reply_sent":
            state.add(Turn(id=str(event.id), role="assistant", text=d["response"]))
            state.replies += 1
        return state

    def request_for(self, state: ChatState, message: RecordedEvent, settings: AgentSettings) -> CompletionRequest:
        system = ChatMessage(role="system", content=settings.system_prompt)
        return CompletionRequest(
            provider=settings.provider,
            model=settings.model_id,
            messages=[system, *state.history_until(str(message.id), message.data["text"])],
            temperature=settings.temperature,
            max_tokens=settings.max_tokens,
            base_url=settings.base_url,
            record_key=str(message.id),
        )

    async def decide(self, state: ChatState, message: RecordedEvent, ctx: Context) -> list[NewEvent]:
        """The completion and the reply built from it are one append: the reply is a function of the recorded
        completion, so recording them together is as durable as two steps and costs one round trip less."""
        if message.type != "chat.message_received" or ctx.effects_of(message):
            return []  # answered already: a redelivered message repeats nothing
        d = message.data
        agent_id, chat_id = d["agent_id"], d["chat_id"]
        request = self.request_for(state, message, self.settings())
        try:
            c = await self.complete(request)
        except ProviderError as e:
            over = isinstance(e, BudgetExceededError)
            return [NewEvent.of(ReplyFailed(agent_id=agent_id, chat_id=chat_id, error=str(e), budget_exceeded=over))]
        return [
            NewEvent.of(completed_event(c, request, agent_id)),
            NewEvent.of(ReplySent(agent_id=agent_id, chat_id=chat_id, response=c.text, channel=d["channel"])),
        ]

    def refused(
        self, state: ChatState, message: RecordedEvent, error: StoreError, decided: list[NewEvent]
    ) -> list[NewEvent]:
        """A reply the log cannot hold (a NUL character from the model, a reply over the size limit) is answered
        as failed: the sender gets a 502 with the reason instead of waiting for a reply that never comes. Its
        completion is kept, without the text: it was paid for."""
        return refusal(message, decided, f"the reply could not be recorded: {error}"[:1000])

    def crashed(
        self, state: ChatState, message: RecordedEvent, ctx: Context, error: Exception, decided: list[NewEvent]
    ) -> list[NewEvent]:
        """A message whose handling failed on something no provider's answer explains (a bug, a database error
        that is no outage) is answered as failed, so its sender hears now; it used to be skipped, and a client
        told with a 202 that the reply would come waited for ever. The error's kind only: its text may name the
        database. A completion decided before the failure is kept without its text, as a refusal keeps it: it
        was paid for (replay reads such a failure as a refusal)."""
        if message.type != "chat.message_received" or ctx.effects_of(message):
            return []
        return refusal(message, decided, f"the reply failed: internal error ({type(error).__name__})")

    def to_snapshot(self, state: ChatState) -> dict[str, Any]:
        return state.model_dump()

    def from_snapshot(self, data: dict[str, Any]) -> ChatState:
        return ChatState.model_validate(data)


def refusal(message: RecordedEvent, decided: list[NewEvent], why: str) -> list[NewEvent]:
    """What a refused reply records: its completion without the text the log refused (the provider was paid, and
    budgets sum the cost of the ``llm.completed`` events; replay finds it by its request hash), then the failure.
    Replay builds a recorded refusal's events here too, from the completion it reads and the recorded reason."""
    d = message.data
    return [
        *paid_without_text(decided),
        NewEvent.of(ReplyFailed(agent_id=d["agent_id"], chat_id=d["chat_id"], error=why)),
    ]
