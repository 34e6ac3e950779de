"""The admin console's routes: the page, its static files and headers, and /admin/api/engine."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from loramux.api.console import STATIC_DIR
from loramux.app import build_state, create_app
from loramux.settings import Settings
from loramux_engine.outputs import EngineStats
from tests.platform.conftest import admin_headers

ASSETS = ["console.js", "lib.js", "tenants.js", "console.css", "favicon.svg"]


class StubEngine:
    """Just what /admin/api/engine reads of an EngineClient."""

    max_model_len = 2048

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
