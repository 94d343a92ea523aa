"""What the API's routes share: the replica's state, its connections, and bearer auth."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.hub import Hub

GUARDED = "/api/"


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
            refused = {"detail": "missing or wrong bearer token"}
            return await JSONResponse(refused, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)
