"""The plumbing the fake LLM servers share: uvicorn on a thread, and a queue of scripted failures to serve first."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse


@dataclass
class Fault:
    """One scripted response served instead of the normal answer: an error status, or a delay before answering."""

    status: int | None = None
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


class FakeServer:
    """Serves ``app`` on 127.0.0.1:``port`` from a daemon thread; use as a context manager.

    ``fail(...)`` queues faults served in order before the normal answer; ``always`` serves one on every request.
    ``hits`` counts every request that reached the server, faults included."""

    def __init__(self, port: int, app: FastAPI) -> None:
        self.port = port
        self.hits = 0
        self.faults: deque[Fault] = deque()
        self.always: Fault | None = None
        self.delay_s = 0.0
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def fail(self, status: int | None = None, *, times: int = 1, delay_s: float = 0.0, **kw: Any) -> FakeServer:
        for _ in range(times):
            self.faults.append(Fault(status=status, delay_s=delay_s, **kw))
        return self

    def error_body(self, status: int) -> dict[str, Any]:
        return {"error": {"message": f"fake error {status}", "type": "server_error"}}

    async def fault_response(self) -> JSONResponse | None:
        """Count the hit; sleep and/or answer with the next scripted fault, if any."""
        self.hits += 1
        fault = self.faults.popleft() if self.faults else self.always
        delay = (fault.delay_s if fault else 0.0) or self.delay_s
        if delay:
            await asyncio.sleep(delay)
        if fault is None or fault.status is None:
            return None
        body = fault.body if fault.body is not None else self.error_body(fault.status)
        return JSONResponse(body, status_code=fault.status, headers=fault.headers)

    def __enter__(self) -> Self:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)
