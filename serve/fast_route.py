"""A route class for the API's busiest route: its ordinary requests skip FastAPI's per-request parameter solving.

FastAPI solves an endpoint's parameters anew on every request, inspecting each one's annotation as it goes: for
the message route (a path parameter, a JSON body, a header, a query parameter and the hub) that was half of
FastAPI's share of a request: 147 µs in-process for a route of its shape, 71 µs with this class
(docs/architecture.md, "Speed"). A request whose inputs are all plainly valid is read here and the endpoint called
with them; any other (a body that does not validate, another content type, a header or query value that is not
plainly valid) goes to FastAPI's own handler, which answers exactly as it always did, its 422s included. The
endpoint's signature still declares every parameter, so the OpenAPI schema is FastAPI's own."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Coroutine
from typing import Any, get_type_hints

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from serve.deps import hub

KEY_MAX = 200  # the longest Idempotency-Key
TIMEOUT_MAX_S = 300.0  # the longest ?timeout=
# A query number read here: digits, maybe a fraction. Anything else ("1e2", " 5", "nan") is FastAPI's to judge.
_PLAIN_NUMBER = re.compile(r"[0-9]{1,6}(\.[0-9]{1,9})?")


class PlainRequestRoute(APIRoute):
    """For an endpoint declared as ``(agent_id, body, h, idempotency_key, timeout)``: a path parameter, a pydantic
    body, the hub, an ``Idempotency-Key`` header of at most ``KEY_MAX`` characters and a ``timeout`` query number
    in ``(0, TIMEOUT_MAX_S]``. The signature is checked when the route is made, so a parameter added to the endpoint
    fails at import instead of being left out here."""

    EXPECTED = ("agent_id", "body", "h", "idempotency_key", "timeout")

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        names = tuple(inspect.signature(endpoint).parameters)
        body = get_type_hints(endpoint, include_extras=False).get("body")
        if names != self.EXPECTED or not (isinstance(body, type) and issubclass(body, BaseModel)):
            raise TypeError(f"{endpoint.__name__}{inspect.signature(endpoint)} is not what PlainRequestRoute reads")
        self.body_model: type[BaseModel] = body
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        solved = super().get_route_handler()
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            args = await self._plain(request)
            if args is None:
                return await solved(request)  # it reads the body again from the request, which keeps it
            response: Response = await endpoint(h=await hub(), **args)
            return response

        return handler

    async def _plain(self, request: Request) -> dict[str, Any] | None:
        """The endpoint's arguments (the hub aside) when every input is plainly valid, else None."""
        if request.headers.get("content-type") != "application/json":
            return None
        key = request.headers.get("idempotency-key")
        if key is not None and len(key) > KEY_MAX:
            return None
        raw = request.query_params.get("timeout")
        timeout = float(raw) if raw is not None and _PLAIN_NUMBER.fullmatch(raw) else None
        if raw is not None and (timeout is None or not 0 < timeout <= TIMEOUT_MAX_S):
            return None
        try:
            body = self.body_model.model_validate_json(await request.body())
        except ValidationError:
            return None
        return {"agent_id": request.path_params["agent_id"], "body": body, "idempotency_key": key, "timeout": timeout}
