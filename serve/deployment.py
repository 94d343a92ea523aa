"""The Ray Serve deployment that hosts the FastAPI app (HTTP API, SSE, webhooks, /metrics)."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from pydantic import BaseModel, SecretStr
from ray import serve

from actors.observability import configure_logging
from serve.hub import Hub


class IngressConfig(BaseModel):
    """The replica's init arguments; the two secrets stay out of its reprs and logs."""

    database_url: SecretStr
    api_token: SecretStr
    namespace: str = "agenthub"
    reply_timeout_s: float = 10.0
    max_body_bytes: int = 256 * 1024
    max_event_bytes: int = 256 * 1024


@serve.deployment(
    name="api",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=256,
    health_check_period_s=1,  # a dead replica is noticed at the next check: with one replica, HTTP waits for it
    logging_config={"enable_access_log": False, "log_level": "WARNING"},  # per-request logs cost CPU per message
)
@serve.ingress()
class ApiIngress:
    """Connects lazily on the first request, so a replica starts even while Postgres is down."""

    def __init__(self, config: IngressConfig) -> None:
        configure_logging()
        self.config = config
        self._hub: Hub | None = None
        self._lock = asyncio.Lock()
        # Imported here, not at module level: Ray pickles this class by value, and module globals would
        # travel as copies instead of the replica's own modules.
        from serve.deps import state

        state.ingress = self
        state.api_token = config.api_token.get_secret_value()
        state.max_body_bytes = config.max_body_bytes

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The app is imported in the replica, not pickled, so it shares the replica's ``state``."""
        from serve.app import app

        return app

    async def hub(self) -> Hub:
        if self._hub is None:
            async with self._lock:
                if self._hub is None:
                    c = self.config
                    self._hub = await Hub.open(
                        c.database_url.get_secret_value(),
                        namespace=c.namespace,
                        reply_timeout_s=c.reply_timeout_s,
                        max_event_bytes=c.max_event_bytes,
                    )
        return self._hub
