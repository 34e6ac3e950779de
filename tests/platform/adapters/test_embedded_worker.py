"""The embedded default: SQLite registry, local storage, Celery on the SQLAlchemy/SQLite broker."""

from __future__ import annotations

from pathlib import Path

from starlette.testclient import TestClient

from loramux.app import build_state, create_app
from loramux.db.migrate import upgrade
from loramux.jobs.embedded import EmbeddedWorker
from loramux.settings import Settings
from tests.fixtures.celery import wait_for_version
from tests.platform.adapters.helpers import upload
from tests.platform.conftest import ADMIN_KEY, admin_headers


def test_embedded_worker_validates_on_the_sqlite_broker(
    tmp_path: Path, tiny_llama_dir: Path, peft_adapter_dir: Path
) -> None:
    settings = Settings(home=tmp_path / "home", admin_key=ADMIN_KEY, model=str(tiny_llama_dir))
    settings.home.mkdir()
    assert settings.resolved_broker_url.startswith("sqla+sqlite:///")
    upgrade(settings.resolved_database_url)
    app_state = build_state(settings)
    log_path = tmp_path / "worker.log"
    with (
        log_path.open("wb") as log,
        TestClient(create_app(settings, app_state=app_state)) as client,
    ):
        tenant = client.post("/admin/api/tenants", json={"name": "demo"}, headers=admin_headers())
        key = client.post(
            f"/admin/api/tenants/{tenant.json()['id']}/keys",
            json={"name": "k"},
            headers=admin_headers(),
        ).json()["key"]
        body = upload(client, key, "bot", peft_adapter_dir).json()
        worker = EmbeddedWorker(settings, log)
        worker.start()
        try:
            version = wait_for_version(app_state.sessions, body["version_id"])
        except AssertionError as error:
            raise AssertionError(
                f"{error}\n{log_path.read_text(errors='replace')[-4000:]}"
            ) from None
        finally:
            worker.stop()
    assert version.status == "ready", version.reason
