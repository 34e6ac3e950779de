"""The admin console's routes: the page, its static files and headers, and /admin/api/engine."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.api.console import STATIC_DIR
from loramux.app import build_state, create_app
from loramux.db.models import UsageRecord
from loramux.db.session import transaction
from loramux.settings import Settings
from loramux_engine.outputs import EngineStats
from tests.platform.conftest import admin_headers
from tests.platform.registry_rows import add_adapter_version

ASSETS = [
    "console.js",
    "lib.js",
    "tenants.js",
    "tenant_detail.js",
    "batches.js",
    "engine.js",
    "prices.js",
    "chart.js",
    "console.css",
    "favicon.svg",
]


class StubEngine:
    """Just what /admin/api/engine reads of an EngineClient."""

    max_model_len = 2048

    def __init__(self) -> None:
        self.running: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self.resident: list[dict[str, Any]] = []

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=3,
            num_waiting=1,
            kv_cache_usage=0.25,
            generation_tokens_per_s=41.5,
            num_generation_tokens_total=900,
            extra={"adapter_cache_device_hits": 7.0, "adapter_cache_loads": 2.0},
            num_running_by_key=self.running,
            num_waiting_by_key=self.waiting,
            resident_adapters=self.resident,
        )


@pytest.fixture
def engine_client(settings: Settings) -> Iterator[TestClient]:
    app_state = build_state(settings, engine=StubEngine())
    with TestClient(create_app(settings, app_state=app_state)) as test_client:
        yield test_client


def assert_console_headers(response: Any) -> None:
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "set-cookie" not in response.headers


def test_index_is_served_with_security_headers(client: TestClient) -> None:
    response = client.get("/admin/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert_console_headers(response)
    assert '<script type="module" src="/admin/static/console.js">' in response.text


def test_admin_without_slash_redirects_to_the_index(client: TestClient) -> None:
    response = client.get("/admin", follow_redirects=False)
    assert response.status_code in (307, 308)
    assert response.headers["location"] == "/admin/"


@pytest.mark.parametrize("name", ASSETS)
def test_static_assets_are_served_with_security_headers(client: TestClient, name: str) -> None:
    response = client.get(f"/admin/static/{name}")
    assert response.status_code == 200
    assert_console_headers(response)
    expected = {"js": "javascript", "css": "text/css", "svg": "image/svg+xml"}
    assert expected[name.rsplit(".", 1)[1]] in response.headers["content-type"]


def test_static_files_stay_inside_the_static_folder(client: TestClient) -> None:
    assert client.get("/admin/static/missing.js").status_code == 404
    assert client.get("/admin/static/../../pyproject.toml").status_code == 404
    assert client.get("/admin/static/%2e%2e/%2e%2e/pyproject.toml").status_code == 404


def test_console_loads_nothing_from_elsewhere_and_never_writes_html() -> None:
    code = ["index.html", *(name for name in ASSETS if name != "favicon.svg")]
    for path in (STATIC_DIR / name for name in code):
        text = path.read_text()
        assert not re.search(r"(src|href|url)\s*[=(]\s*[\"']?(https?:)?//", text), path
        assert "innerHTML" not in text and "outerHTML" not in text, path
        assert "insertAdjacentHTML" not in text and "document.write" not in text, path
        assert "localStorage" not in text and "document.cookie" not in text, path
    # No inline script or style: the CSP would block them.
    index = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", index)
    assert "<style" not in index and "style=" not in index and " on" + "click=" not in index


def test_engine_status_needs_the_admin_key(
    engine_client: TestClient, make_tenant: Callable[..., tuple[dict[str, Any], str]]
) -> None:
    assert engine_client.get("/admin/api/engine").status_code == 401
    _, secret = make_tenant("acme")
    denied = engine_client.get("/admin/api/engine", headers={"Authorization": f"Bearer {secret}"})
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "insufficient_scope"


def test_engine_status_reports_stats_and_adapter_cache(engine_client: TestClient) -> None:
    response = engine_client.get("/admin/api/engine", headers=admin_headers())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "engine"
    assert body["base_model_id"] == "smollm2-135m-instruct"
    assert body["max_model_len"] == 2048
    assert body["stats"]["num_running"] == 3
    assert body["stats"]["num_waiting"] == 1
    assert body["stats"]["kv_cache_usage"] == 0.25
    assert body["stats"]["generation_tokens_per_s"] == 41.5
    assert "extra" not in body["stats"]
    assert body["adapter_cache"] == {"adapter_cache_device_hits": 7.0, "adapter_cache_loads": 2.0}


def test_engine_status_without_an_engine_is_503_in_openai_shape(client: TestClient) -> None:
    response = client.get("/admin/api/engine", headers=admin_headers())
    assert response.status_code == 503
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "service_unavailable"
    assert "engine" in error["message"]


def test_engine_status_names_tenants_adapters_and_recent_minutes(
    engine_client: TestClient,
    make_tenant: Callable[..., tuple[dict[str, Any], str]],
    db: sessionmaker[Session],
) -> None:
    acme, _ = make_tenant("acme")
    globex, _ = make_tenant("globex")
    now = datetime.now(UTC)
    with transaction(db) as session:
        version = add_adapter_version(session, acme["id"], "bot", "a" * 64)
        session.add_all(
            UsageRecord(
                tenant_id=acme["id"],
                request_id=f"r{i}",
                endpoint="/v1/completions",
                prompt_tokens=10,
                completion_tokens=60,
                latency_ms=100 * (i + 1),
                status="ok",
                created_at=now,
            )  # fmt: skip
            for i in range(10)
        )
        session.add(
            UsageRecord(
                tenant_id=acme["id"],
                request_id="old",
                endpoint="/v1/completions",
                prompt_tokens=1,
                completion_tokens=1,
                status="ok",
                created_at=now - timedelta(hours=1),
            )  # fmt: skip
        )
    engine: StubEngine = engine_client.app.state.loramux.engine  # type: ignore[attr-defined]
    engine.running = {acme["id"]: 2, globex["id"]: 1}
    engine.waiting = {globex["id"]: 4}
    engine.resident = [{"slot": 1, "id": version.id, "namespace": acme["id"], "pinned": True}]
    body = engine_client.get("/admin/api/engine", headers=admin_headers()).json()
    assert body["tenants"] == [
        {"tenant_id": acme["id"], "tenant": "acme", "num_running": 2, "num_waiting": 0},
        {"tenant_id": globex["id"], "tenant": "globex", "num_running": 1, "num_waiting": 4},
    ]
    assert body["resident_adapters"] == [
        {
            "slot": 1,
            "adapter_version_id": version.id,
            "tenant_id": acme["id"],
            "tenant": "acme",
            "adapter": "bot",
            "version": 1,
            "pinned": True,
        }
    ]
    assert body["adapter_cache_tiers"]["device"] == {"hits": 7.0}
    buckets = body["recent"]["buckets"]
    assert len(buckets) == 15 and [b["start"] % 60 for b in buckets] == [0] * 15
    # the minute the records were written in (the last, or the one before at a minute's turn)
    (last,) = [b for b in buckets if b["start"] <= now.timestamp() < b["start"] + 60]
    assert [b["num_requests"] for b in buckets if b is not last] == [0] * 14
    assert last["num_requests"] == 10 and last["completion_tokens"] == 600
    assert last["completion_tokens_per_s"] == 10.0
    assert (last["latency_p50_ms"], last["latency_p95_ms"]) == (500, 1000)
    assert buckets[0]["latency_p50_ms"] is None
