"""The one settings object, read from ``LORAMUX_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LORAMUX_", env_file=None, extra="ignore", frozen=True
    )

    home: Path = Field(default_factory=lambda: Path.home() / ".loramux")
    database_url: str | None = None
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    redis_url: str | None = None
    broker_url: str | None = None
    model: str = "smollm2-135m-instruct"
    admin_key: SecretStr | None = None

    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    max_body_bytes: int = 4 * 1024 * 1024
    max_upload_bytes: int = 1024 * 1024 * 1024
    max_adapter_bytes: int = 512 * 1024 * 1024
    max_lora_rank: int = 64
    rate_limit_window_s: float = 60.0
    require_services: bool = False

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'registry.db'}"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.home / "storage").as_uri()

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.home / 'broker.db'}"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
