"""HTTP request metrics of the ingress, by route template and status, in the process's Prometheus registry.

Ray Serve's HAProxy mode can count requests too, but it does so by having HAProxy send one log datagram per
request to a Python actor that parses it: that was the HAProxy manager's whole load, ~0.1 ms of CPU per request
(docs/architecture.md). Counting in the replica that already handles the request costs a few microseconds."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("agenthub_http_requests_total", "HTTP requests answered", ["method", "route", "status"])
LATENCY = Histogram(
    "agenthub_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UNMATCHED = "unmatched"  # no route took it (404s of any path; 401s and 413s refused before routing): one series


class RequestMetrics:
    """Pure ASGI, outermost, so it also sees the answers of the middlewares inside it (the auth's 401, the body
    limit's 413: both before routing, so ``unmatched``). The route label is the matched route's template
    (``/api/v1/agents/{agent_id}``), never the raw path, so the number of series stays bounded whatever clients
    send. An exception that escapes the app is counted as the 500 Starlette answers with; a request whose client
    left before the response began, with status ``0``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status = status or 500
            raise
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or UNMATCHED
            method = scope["method"]
            REQUESTS.labels(method, path, str(status)).inc()
            LATENCY.labels(method, path).observe(time.perf_counter() - start)
