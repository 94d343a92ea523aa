"""What the API's routes share: the replica's state, its connections, and bearer auth."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.hub import Hub

GUARDED = "/api/"
REFUSED = {
    "description": "missing or wrong bearer token",
    "content": {"application/json": {"schema": {"type": "object", "properties": {"detail": {"type": "string"}}}}},
}


class IngressState:
    """Set by the replica that hosts this app (module-level: Ray Serve copies the FastAPI object)."""

    ingress: Any = None
    api_token: str = ""
    max_body_bytes: int = 256 * 1024


state = IngressState()


async def hub() -> Hub:
    """The replica's connections, opened on first use (503 while the database is down)."""
    return await state.ingress.hub()


HubDep = Annotated[Hub, Depends(hub)]

FRESH_WAIT_S = 5.0
FRESH = (
    f"Wait (up to {FRESH_WAIT_S:g} s) until the read models hold every event committed before the request: they "
    "trail the log by a moment otherwise (the projector batches). 503 if they do not catch up in time (a "
    "transaction held open holds them back)."
)


async def read_models(h: HubDep, fresh: bool = Query(False, description=FRESH)) -> Hub:
    """The hub for a route that reads the projector's tables; ``?fresh=true`` makes the read see the caller's own
    writes (and everything else committed before it) instead of whatever the last delivery projected."""
    if fresh and not await h.projected(FRESH_WAIT_S):
        raise HTTPException(
            503,
            f"the read models did not catch up with the log within {FRESH_WAIT_S:g} s (an open transaction holds "
            "deliveries back: see /healthz); retry, or read without fresh",
            headers={"Retry-After": "1"},
        )
    return h


ReadModelsDep = Annotated[Hub, Depends(read_models)]


def authorized(header: str | None) -> bool:
    """``Authorization: Bearer <token>`` with this deployment's token (compared in constant time)."""
    scheme, _, credentials = (header or "").partition(" ")
    token = state.api_token
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(credentials.encode(), token.encode())


class BearerAuth:
    """401 for a request under ``/api/`` without the token, before anything reads its body. As a route
    dependency the check came too late: FastAPI reads and parses the body first, so an anonymous client got a
    422 for bad JSON and had its body buffered. Pure ASGI, like the body limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope["path"].startswith(GUARDED)
        if guarded and not authorized(Headers(scope=scope).get("authorization")):
            refused = {"detail": REFUSED["description"]}
            return await JSONResponse(refused, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)


def document_bearer(app: FastAPI) -> None:
    """``BearerAuth`` guards ``/api/`` as middleware, which FastAPI's schema cannot see: add the scheme to
    ``/openapi.json`` and mark each guarded operation with it and its 401, so generated clients send the token."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # FastAPI builds it once and caches it; the marks below are idempotent
        schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in schema["paths"].items():
            if path.startswith(GUARDED):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
                    operation["responses"].setdefault("401", REFUSED)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
