"""Secrets by reference: integration tokens are kept in the ``secrets`` table, events carry ``secret://…``."""

from __future__ import annotations

import re
import secrets as _secrets

from events.hub import AgentSettings
from storage.eventlog import EventLog

SECRET_KEY_RE = re.compile(r"(token|secret|password|api_key|apikey)", re.IGNORECASE)
PREFIX = "secret://"


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
        """Replace every secret-looking integration setting by a reference before it goes into an event."""
        out = settings.model_copy(deep=True)
        for integration in out.integrations:
            for key, value in list(integration.settings.items()):
                if SECRET_KEY_RE.search(key) and isinstance(value, str) and not value.startswith(PREFIX):
                    integration.settings[key] = await self.put(value)
        return out
