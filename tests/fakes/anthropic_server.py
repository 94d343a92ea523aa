"""A local stand-in for Anthropic's messages API: ``POST /v1/messages`` in the real wire format over HTTP."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.fakes.http_fake import FakeServer


class FakeAnthropic(FakeServer):
    """Answers with a text block, or, when the request forces a tool, a ``tool_use`` block whose input is
    ``structured`` (``raw_input`` is sent verbatim instead, to send a malformed one). With ``api_key`` set, any
    other key gets a 401 that echoes it back."""

    def __init__(
        self,
        port: int,
        reply: str = "Hello from Claude",
        *,
        structured: dict[str, Any] | None = None,
        raw_input: Any = None,
        api_key: str | None = None,
    ) -> None:
        self.reply = reply
        self.structured = structured
        self.raw_input = raw_input
        self.api_key = api_key
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        app = FastAPI()

        @app.post("/v1/messages")
        async def messages(request: Request) -> Any:
            body = await request.json()
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            # older SDKs send x-api-key, newer ones a bearer token
            given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
            if self.api_key is not None and given != self.api_key:
                self.hits += 1
                return JSONResponse(
                    {
                        "type": "error",
                        "error": {"type": "authentication_error", "message": f"invalid x-api-key: {given}"},
                    },
                    status_code=401,
                )
            fault = await self.fault_response()
            if fault is not None:
                return fault
            choice = body.get("tool_choice") or {}
            if choice.get("type") == "tool":
                content: list[dict[str, Any]] = [
                    {
                        "type": "tool_use",
                        "id": f"toolu_{len(self.requests)}",
                        "name": choice["name"],
                        "input": self.raw_input if self.raw_input is not None else (self.structured or {}),
                    }
                ]
                stop_reason = "tool_use"
            else:
                content = [{"type": "text", "text": self.reply}]
                stop_reason = "end_turn"
            words = len(str(body.get("system", "")).split()) + sum(
                len(str(m["content"]).split()) for m in body["messages"]
            )
            return {
                "id": f"msg_{len(self.requests)}_{int(time.time())}",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": None,
                "usage": {"input_tokens": words, "output_tokens": 7},
            }

        super().__init__(port, app)

    def error_body(self, status: int) -> dict[str, Any]:
        kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": f"fake error {status}"}}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
