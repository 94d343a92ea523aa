"""Secrets by reference: integration tokens are kept in the ``secrets`` table, events carry ``secret://…``."""

from __future__ import annotations

import re
import secrets as _secrets
from typing import Any

from events.hub import AgentSettings
from storage.eventlog import EventLog

SECRET_KEY_RE = re.compile(
    r"token|secret|passw(or)?d|passphrase|api_?key|credential|authori[sz]ation|private_?key|signing_?key"
    r"|access_?key|session_?key|encryption_?key|bearer|cookie|(^|_)(o?auth|authentication|pwd|dsn)(_|$)",
    re.IGNORECASE,
)
"""Keys whose values are secrets, matched against the key in snake case (``apiKey`` → ``api_key``, ``X-Auth`` →
``x_auth``): anywhere in it for the telling words (``bot_token``, ``webhook_secret``, ``client_credentials``), as a
whole word for the short ones (``auth`` but not ``author``)."""
PREFIX = "secret://"


def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).replace("-", "_").replace(".", "_").replace(" ", "_")


def is_secret_key(key: object) -> bool:
    return isinstance(key, str) and SECRET_KEY_RE.search(_snake(key)) is not None


class SecretStore:
    def __init__(self, store: EventLog) -> None:
        self.store = store

    async def put(self, value: str) -> str:
        ref = PREFIX + _secrets.token_hex(16)
        await self.store.execute("INSERT INTO secrets (ref, value) VALUES ($1, $2)", ref, value)
        return ref

    async def get(self, ref: str) -> str | None:
        return await self.store.fetchval("SELECT value FROM secrets WHERE ref = $1", ref)

    async def mask_settings(self, agent_id: str, settings: AgentSettings) -> AgentSettings:
        """Replace every secret-looking integration setting by a reference before it goes into an event: at any
        depth of nested dicts and lists, a string under a secret-looking key, and every string anywhere below such
        a key (``{"credentials": {"user": …, "pass": …}}``, ``{"api_keys": […]}``). Numbers and booleans stay."""
        out = settings.model_copy(deep=True)
        for integration in out.integrations:
            integration.settings = await self._mask(integration.settings, secret=False)
        return out

    async def _mask(self, value: Any, secret: bool) -> Any:
        if isinstance(value, str):
            return await self.put(value) if secret and not value.startswith(PREFIX) else value
        if isinstance(value, dict):
            return {k: await self._mask(v, secret or is_secret_key(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [await self._mask(v, secret) for v in value]
        return value
