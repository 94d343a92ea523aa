"""Secrets never reach the log or a repr: integration settings are masked by reference at any depth
(storage/secrets.py); the database password and the API token stay out of the configs that travel to actors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from cluster.bootstrap import System, runtime_config
from cluster.settings import Settings
from events.hub import AgentSettings, IntegrationConfig
from serve.deployment import IngressConfig
from storage.eventlog import EventLog
from storage.secrets import PREFIX, SecretStore, is_secret_key


def test_secret_looking_keys() -> None:
    secret = [
        "bot_token", "botToken", "webhook_secret", "password", "passwd", "api_key", "apiKey", "API-KEY",
        "Authorization", "auth", "x-auth", "oauth", "credentials", "client_credential", "signing_key",
        "privateKey", "access_key", "pwd", "dsn", "cookie",
    ]  # fmt: skip
    plain = ["author", "enabled", "url", "chat_id", "username", "keyboard", "channel", "dsnx"]
    assert [k for k in secret if not is_secret_key(k)] == []
    assert [k for k in plain if is_secret_key(k)] == []


async def test_nested_secrets_are_masked_and_kept_by_reference(eventlog: EventLog) -> None:
    store = SecretStore(eventlog)
    settings = AgentSettings(
        integrations=[
            IntegrationConfig(
                type="webhook",
                settings={
                    "url": "https://example.com/hook",
                    "enabled": True,
                    "headers": {"Authorization": "Bearer abc", "X-Trace": "on"},
                    "auth": {"user": "bob", "pass": "hunter2", "port": 8443},
                    "targets": [{"name": "a", "signing_key": "sk-1"}, {"name": "b", "webhook_secret": "ws-2"}],
                    "api_keys": ["k1", "k2"],
                    "bot_token": "123:SECRET",
                    "token_ref": PREFIX + "already",
                },
            )
        ]
    )
    masked = (await store.mask_settings("a1", settings)).integrations[0].settings
    raw = json.dumps(masked)
    for value in ("Bearer abc", "bob", "hunter2", "sk-1", "ws-2", "k1", "k2", "123:SECRET"):
        assert value not in raw
    assert masked["url"] == "https://example.com/hook" and masked["enabled"] is True
    assert masked["headers"]["X-Trace"] == "on" and masked["auth"]["port"] == 8443
    assert [t["name"] for t in masked["targets"]] == ["a", "b"]
    assert masked["token_ref"] == PREFIX + "already"  # a reference is not masked again
    assert await store.get(masked["headers"]["Authorization"]) == "Bearer abc"
    assert await store.get(masked["auth"]["pass"]) == "hunter2"
    assert await store.get(masked["targets"][0]["signing_key"]) == "sk-1"
    assert [await store.get(r) for r in masked["api_keys"]] == ["k1", "k2"]
    assert settings.integrations[0].settings["bot_token"] == "123:SECRET"  # the caller's copy is untouched


def test_the_database_password_and_the_api_token_stay_out_of_configs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configs every actor and the ingress are built from travel to Ray workers and end up in reprs, error
    messages and logs; the database URL's password and the API token must not come with them."""
    url = "postgresql://agenthub:pg-Secret-1@db.internal:5432/agenthub"
    monkeypatch.setenv("DATABASE_URL", url)
    settings = Settings(data_dir=tmp_path, api_token="api-Secret-2")
    config = runtime_config(settings, url)
    ingress = IngressConfig(database_url=url, api_token="api-Secret-2")
    system = System(settings, url, None, "api-Secret-2", token_generated=False, orchestrator=None)
    models = (settings, config, ingress)
    texts = [repr(system), *map(repr, models), *(str(m.model_dump()) for m in models)]
    texts += [m.model_dump_json() for m in models]
    assert [t for t in texts if "Secret-" in t] == []
    # ... and each still hands the real value to what connects, after the trip to a worker
    config, ingress = pickle.loads(pickle.dumps((config, ingress)))
    assert settings.database_url is not None and settings.database_url.get_secret_value() == url
    assert config.database_url.get_secret_value() == ingress.database_url.get_secret_value() == url
    assert ingress.api_token.get_secret_value() == "api-Secret-2"
