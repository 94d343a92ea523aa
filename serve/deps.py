"""Dependencies shared by the API's routers: the replica's state, its connections, and bearer auth."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serve.hub import Hub

bearer = HTTPBearer(auto_error=False)


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


async def authorized(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    token = state.api_token
    if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


api = [Depends(authorized)]
