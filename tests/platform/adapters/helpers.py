"""Requests and assertions shared by the adapter tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def upload(
    client: TestClient,
    secret: str,
    name: str,
    adapter_dir: Path | None = None,
    *,
    config: bytes | None = None,
    weights: bytes | None = None,
    headers: dict[str, str] | None = None,
    extra_files: dict[str, tuple[str, bytes]] | None = None,
) -> Any:
    """``POST /v1/adapters`` with the two files of ``adapter_dir`` (or the bytes given)."""
    if adapter_dir is not None:
        config = config if config is not None else (adapter_dir / CONFIG).read_bytes()
        weights = weights if weights is not None else (adapter_dir / WEIGHTS).read_bytes()
    files: dict[str, tuple[str, bytes]] = {}
    if config is not None:
        files["config"] = (CONFIG, config)
    if weights is not None:
        files["weights"] = (WEIGHTS, weights)
    files.update(extra_files or {})
    return client.post(
        "/v1/adapters",
        data={"name": name},
        files=files,
        headers={**bearer(secret), **(headers or {})},
    )


def assert_openai_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def wait_validated(http: Any, secret: str, name: str, timeout_s: float = 120) -> dict[str, Any]:
    """Poll ``GET /v1/adapters/{name}`` until validation ends; the adapter as shown then."""
    deadline = time.monotonic() + timeout_s
    while (shown := http.get(f"/v1/adapters/{name}", headers=bearer(secret)).json())["status"] in (
        "uploading",
        "validating",
    ):
        assert time.monotonic() < deadline, f"{name} never finished validating"
        time.sleep(0.3)
    return dict(shown)
