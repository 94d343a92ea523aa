"""A local stand-in for an OpenAI-compatible server (vLLM, llama.cpp, Ollama): the real wire format over HTTP."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI, Request


class FakeOpenAI:
    """Answers ``POST /v1/chat/completions`` with a canned reply and records the requests it received."""

    def __init__(self, port: int, reply: str = "Hello from the compatible server") -> None:
        self.port = port
        self.reply = reply
        self.requests: list[dict] = []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def completions(request: Request) -> dict:
            body = await request.json()
            self.requests.append(body)
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
                        "message": {"role": "assistant", "content": self.reply},
                    }
                ],
                "usage": {"prompt_tokens": prompt, "completion_tokens": 6, "total_tokens": prompt + 6},
            }

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)
