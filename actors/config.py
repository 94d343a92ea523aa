"""What every actor process needs to know to join the system: passed to Ray actors at creation."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, SecretStr


class RuntimeConfig(BaseModel):
    database_url: str
    data_dir: Path = Path(".agenthub")
    namespace: str = "agenthub"
    max_event_bytes: int = 256 * 1024
    heartbeat_interval_s: float = 5.0
    max_restart_attempts: int = 5
    max_active_entities: int = 1000
    snapshot_every: int = 200
    poll_interval_s: float = 1.0
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str | None = None
    llm_timeout_s: float = 60.0
    llm_max_attempts: int = 4
    llm_cache_ttl_s: float = 3600.0
