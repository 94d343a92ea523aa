"""Settings from ``AGENTHUB_*`` environment variables (and ``DATABASE_URL``), via pydantic-settings."""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from actors.config import ActorSettings


class Settings(BaseSettings, ActorSettings):
    """The process settings: the actors' tunables (actors/config.py) plus what only the launcher needs."""

    model_config = SettingsConfigDict(env_prefix="AGENTHUB_", env_file=".env", extra="ignore")

    data_dir: Path = Path(".agenthub")
    database_url: SecretStr | None = Field(None, validation_alias=AliasChoices("DATABASE_URL", "AGENTHUB_DATABASE_URL"))
    pg_port: int = 54329
    api_token: SecretStr | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    ray_address: str | None = None
    ray_namespace: str = "agenthub"
    num_cpus: int = 2
    dashboard_port: int = 8265
    reply_timeout_s: float = 10.0
    # how long a stop lets the deliveries under way finish before the actors go (an LLM call may be in one)
    drain_timeout_s: float = 10.0

    def resolve_api_token(self) -> tuple[str, bool]:
        """The configured token, or one generated at first start and kept in the data dir.
        Returns ``(token, generated_now)``."""
        if self.api_token is not None:
            return self.api_token.get_secret_value(), False
        path = self.data_dir / "api_token"
        if path.exists():
            return path.read_text().strip(), False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
        with os.fdopen(fd, "w") as f:
            f.write(token)
        return token, True


@lru_cache
def get_settings() -> Settings:
    return Settings()
