"""Settings of a fleetmesh process, read from flags and `FLEETMESH_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HTTP_PORT = 8080
DEFAULT_NATS_PORT = 4223
DEFAULT_MQTT_PORT = 1883


class Settings(BaseSettings):
    """Everything a fleetmesh process needs to start; nothing is read at import time."""

    model_config = SettingsConfigDict(env_prefix="FLEETMESH_", extra="ignore")

    data_dir: Path = Path(".fleetmesh")
    host: str = "127.0.0.1"
    http_port: int | None = Field(default=None, ge=0, le=65535)
    nats_port: int | None = Field(default=None, ge=0, le=65535)
    mqtt_port: int | None = Field(default=None, ge=0, le=65535)
    nats: str | None = None
    nats_user: str | None = None
    nats_password: str | None = None
    nats_system_user: str | None = None
    nats_system_password: str | None = None
    """The NATS system account's login on external NATS: MQTT presence (connect and
    disconnect events) needs it; without it only timeouts mark MQTT devices offline."""
    database_url: str | None = None
    gateway_url: str | None = None
    api_key: str | None = None
    nats_replicas: int = Field(default=1, ge=1, le=5)
    shared_sqlite: bool = False
    callout_issuer_seed: str | None = None
    registry: str | None = None
    allow_private_webhooks: bool = False
    mqtt_bridge: str | None = None
    """An external MQTT broker to take device telemetry from (`mqtt://host:1883`)."""
    log_level: str = "INFO"
    log_json: bool = False
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    event_retention_days: float = Field(default=30.0, gt=0)
    event_retention_bytes: int = Field(default=1024**3, gt=0)
    outbox_poll_seconds: float = Field(default=0.5, gt=0)

    @property
    def external_nats(self) -> list[str]:
        """The external NATS servers given with `--nats`, or an empty list for embedded."""
        if not self.nats:
            return []
        return [url.strip() for url in self.nats.split(",") if url.strip()]

    @property
    def sqlalchemy_url(self) -> str:
        """The async SQLAlchemy URL: SQLite in the data dir unless a database URL is given."""
        if not self.database_url:
            return f"sqlite+aiosqlite:///{(self.data_dir / 'fleetmesh.db').resolve()}"
        return to_async_url(self.database_url)


def to_async_url(url: str) -> str:
    """Map plain `postgresql://` and `sqlite://` URLs to their async drivers."""
    for plain, driver in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url
