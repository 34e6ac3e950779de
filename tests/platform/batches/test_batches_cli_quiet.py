"""``loramux batches create --quiet`` prints the batch's id and nothing else on stdout, so
``BATCH=$(loramux batches create FILE --wait --quiet)`` works, as the README does."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from loramux.app import create_app
from loramux.state import AppState
from tests.platform.batches.conftest import jsonl, request_line
from tests.platform.cli_runner import LORAMUX, TIMEOUT_S, loramux, tenant_env
from tests.platform.conftest import admin_headers
from tests.platform.live_server import serve

PROMPT = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}


@pytest.fixture
def registry_backend() -> str:
    return "sqlite"  # the embedded default, where a new user starts


@pytest.fixture
def env(app_state: AppState) -> Iterator[dict[str, str]]:
    with serve(create_app(app_state.settings, app_state=app_state)) as url:
        with httpx.Client(base_url=url, headers=admin_headers()) as admin:
            tenant = admin.post("/admin/api/tenants", json={"name": "acme"}).json()
            key = admin.post(f"/admin/api/tenants/{tenant['id']}/keys", json={"name": "cli"})
        yield tenant_env(url, key.json()["key"])


def listed_ids(env: dict[str, str]) -> list[str]:
    headers = {"Authorization": f"Bearer {env['LORAMUX_API_KEY']}"}
    with httpx.Client(base_url=env["LORAMUX_BASE_URL"], headers=headers) as http:
        return [b["id"] for b in http.get("/v1/batches").json()["data"]]


@pytest.fixture
def requests_file(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl([request_line("a", {"model": "nobody-has-this", **PROMPT})]))
    return path


def test_quiet_prints_only_the_new_batch_id(env: dict[str, str], requests_file: Path) -> None:
    result = loramux(["batches", "create", str(requests_file), "--quiet"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == listed_ids(env)[:1]
    assert result.stdout.startswith("batch_")


def test_quiet_with_wait_prints_the_id_once_the_batch_ends(
    env: dict[str, str],
    app_state: AppState,
    requests_file: Path,
    run_batch: Callable[..., str],
    tmp_path: Path,
) -> None:
    good = {"model": app_state.base_model_id, **PROMPT}
    requests_file.write_bytes(jsonl([request_line("a", good)]))
    command = [LORAMUX, "batches", "create", str(requests_file), "--wait", "--quiet"]
    process = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        while not (ids := listed_ids(env)):
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        assert run_batch(ids[0]) == "completed"
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert stdout == f"{ids[0]}\n"
