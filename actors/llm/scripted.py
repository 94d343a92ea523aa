"""The deterministic scripted provider: the same request always gives the same completion, with no network."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from actors.llm.base import Completion, CompletionRequest, count_tokens, elapsed_ms, parse_structured


class ScriptRule(BaseModel):
    """One scripted answer: used when ``pattern`` (a regex, DOTALL) is found in the prompt."""

    pattern: str
    text: str | None = None
    structured: dict[str, Any] | None = None
    delay_s: float = Field(0.0, ge=0, description="think this long first: a slow model, for timeout tests")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v, re.DOTALL)
        except re.error as e:
            raise ValueError(f"not a valid regex: {e}") from None
        return v

    @model_validator(mode="after")
    def _answers_something(self) -> ScriptRule:
        if self.text is None and self.structured is None:
            raise ValueError("a script rule needs text or structured")
        return self

    def answer(self) -> str:
        return self.text if self.text is not None else json.dumps(self.structured)


class ScriptedProvider:
    """Deterministic replies for tests and the demo.

    The first rule found in the last user message answers (else the first one found in the system prompt). With
    no matching rule it answers with the turn number and the last user message, so a reply proves how much
    history the agent had (which is how the demo shows an agent recovered its conversation from the log)."""

    def __init__(self, rules: list[ScriptRule] | None = None, name: str = "scripted") -> None:
        self.name = name
        self.rules = list(rules or [])
        self._compiled = [(re.compile(r.pattern, re.DOTALL), r) for r in self.rules]

    def __repr__(self) -> str:
        return f"ScriptedProvider(name={self.name!r}, rules={len(self.rules)})"

    def match(self, request: CompletionRequest) -> ScriptRule | None:
        if not self._compiled:  # a hub agent's provider: nothing to search (the system prompt walks the history)
            return None
        for haystack in (request.last_user_message, request.system_prompt):
            text = haystack()
            for pattern, rule in self._compiled:
                if pattern.search(text):
                    return rule
        return None

    async def complete(self, request: CompletionRequest) -> Completion:
        started = time.perf_counter()
        rule = self.match(request)
        structured: dict[str, Any] | None
        if rule is not None:
            await asyncio.sleep(rule.delay_s)
            text = rule.answer()
            structured = rule.structured
            if structured is None and request.response_schema is not None:
                structured = parse_structured(self.name, text)
        else:
            user_turns = [m.content for m in request.messages if m.role == "user"]
            last = user_turns[-1] if user_turns else ""
            text = f"[{request.model}] turn {len(user_turns)}: you said {last!r}"
            structured = {} if request.response_schema is not None else None
        return Completion(
            text=text,
            provider=self.name,
            model=request.model,
            prompt_tokens=sum(m.tokens for m in request.messages),
            completion_tokens=count_tokens(text),
            latency_ms=elapsed_ms(started),
            structured=structured,
        )
