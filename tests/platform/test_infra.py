"""infra/ cannot run here (no container engine); these checks keep it honest against the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from loramux.settings import Settings

INFRA = Path(__file__).resolve().parents[2] / "infra"
DEFAULTED = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")
REQUIRED = re.compile(r"\$\{[A-Z_]+:\?[^}]*\}")


def _setting_names(text: str) -> set[str]:
    return set(re.findall(r"\bLORAMUX_([A-Z0-9_]+)", text))


def test_every_loramux_variable_in_infra_is_a_setting() -> None:
    fields = {name.upper() for name in Settings.model_fields}
    used: set[str] = set()
    for path in INFRA.rglob("*"):
        if path.is_file() and path.suffix != ".whl":  # infra/gpu/wheels: vendored wheels
            used |= _setting_names(path.read_text())
    assert used, "infra/ names no LORAMUX_* variable"
    assert used - fields == set()


def test_every_loramux_variable_in_the_readme_is_a_setting() -> None:
    used = _setting_names((INFRA.parent / "README.md").read_text())
    assert "HOST" in used and "PORT" in used
    assert used - {name.upper() for name in Settings.model_fields} == set()


def _compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    compose: dict[str, Any] = yaml.safe_load((INFRA / "compose.yaml").read_text())
    return compose


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` as its default, ``${VAR:?msg}`` as a placeholder."""
    return REQUIRED.sub("lmx_placeholder", DEFAULTED.sub(r"\1", value))


def test_compose_settings_load_as_production(monkeypatch: pytest.MonkeyPatch) -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "minio", "create-bucket", "loramux", "worker"} <= set(services)
    env = services["loramux"]["environment"]
    assert services["worker"]["environment"] == env
    assert services["worker"]["entrypoint"][:3] == ["celery", "-A", "loramux.jobs.app"]
    for name, value in env.items():
        monkeypatch.setenv(name, _interpolate(str(value)))
    settings = Settings()
    assert settings.database_url is not None
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.database_url.endswith("@postgres:5432/loramux")
    assert settings.storage_url == "s3://loramux/prod"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert (settings.redis_url, settings.broker_url) == (
        "redis://redis:6379/0",
        "redis://redis:6379/1",
    )
    assert settings.admin_key is not None
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)


def test_bucket_job_creates_the_storage_bucket() -> None:
    services = _compose()["services"]
    bucket = services["loramux"]["environment"]["LORAMUX_STORAGE_URL"].split("/")[2]
    assert f"store/{bucket}" in " ".join(services["create-bucket"]["entrypoint"])


def test_prometheus_scrapes_loramux_metrics() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["loramux:8000"]
    # /metrics asks for the admin key by default: the scrape sends the one compose holds.
    secret = job["authorization"]["credentials_file"].rsplit("/", 1)[1]
    services = _compose()
    assert services["secrets"][secret]["environment"] == "LORAMUX_ADMIN_KEY"
    assert secret in services["services"]["prometheus"]["secrets"]
