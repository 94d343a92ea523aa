"""A local stand-in for an OpenAI-compatible server (vLLM, llama.cpp, Ollama): the real wire format over HTTP."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.fakes.http_fake import FakeServer


class FakeOpenAI(FakeServer):
    """Answers ``POST /v1/chat/completions`` with a canned reply and records the requests it received.

    A request with ``response_format`` gets ``structured`` as JSON (or ``raw_structured`` verbatim, to send
    malformed JSON). With ``api_key`` set, any other key gets a 401 that echoes it back, as api.openai.com does."""

    def __init__(
        self,
        port: int,
        reply: str = "Hello from the compatible server",
        *,
        structured: dict[str, Any] | None = None,
        raw_structured: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.reply = reply
        self.structured = structured
        self.raw_structured = raw_structured
        self.api_key = api_key
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def completions(request: Request) -> Any:
            body = await request.json()
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if self.api_key is not None and given != self.api_key:
                self.hits += 1
                return JSONResponse(
                    {
                        "error": {
                            "message": f"Incorrect API key provided: {given}.",
                            "type": "invalid_request_error",
                            "code": "invalid_api_key",
                        }
                    },
                    status_code=401,
                )
            fault = await self.fault_response()
            if fault is not None:
                return fault
            if "response_format" in body:
                content = self.raw_structured if self.raw_structured is not None else json.dumps(self.structured or {})
            else:
                content = self.reply
            prompt = sum(len(m["content"].split()) for m in body["messages"])
            return {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": content},
                    }
                ],
                "usage": {"prompt_tokens": prompt, "completion_tokens": 6, "total_tokens": prompt + 6},
            }

        super().__init__(port, app)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"
