"""What every actor process needs to know to join the system: passed to Ray actors at creation."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, SecretStr


class ActorSettings(BaseModel):
    """Tunables every actor process shares. The process settings (cluster/settings.py) extend this class, so
    each tunable is declared once and ``AGENTHUB_<NAME>`` reaches the actors by the same name."""

    max_event_bytes: int = 256 * 1024
    heartbeat_interval_s: float = 5.0
    max_restart_attempts: int = 5
    max_active_entities: int = 1000
    snapshot_every: int = 200
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str | None = None
    llm_timeout_s: float = 60.0
    llm_max_attempts: int = 4
    llm_cache_ttl_s: float = 3600.0
    held_back_warn_s: float = 10.0  # one open transaction holding events back this long is reported


class RuntimeConfig(ActorSettings):
    """What an actor needs besides the tunables: where the log is, where files go, its Ray namespace."""

    database_url: SecretStr  # its password stays out of reprs, logs and dumps of this config
    data_dir: Path = Path(".agenthub")
    namespace: str = "agenthub"
    poll_interval_s: float = 1.0
