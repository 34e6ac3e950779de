"""``loramux batches ...`` as a tenant runs it, against the app served over real HTTP; the
runner runs in the test (as in the other batch tests) while the CLI waits."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loramux.app import create_app
from loramux.state import AppState
from tests.platform.batches.conftest import jsonl, request_line
from tests.platform.cli_runner import (
    LORAMUX,
    TIMEOUT_S,
    assert_fails_in_one_line,
    loramux,
    tenant_env,
)
from tests.platform.conftest import admin_headers
from tests.platform.live_server import serve

PROMPT = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}


@pytest.fixture
def registry_backend() -> str:
    return "sqlite"  # the embedded default, where a new user starts


@pytest.fixture
def live_url(app_state: AppState) -> Iterator[str]:
    with serve(create_app(app_state.settings, app_state=app_state)) as url:
        yield url


@pytest.fixture
def tenant_key(live_url: str) -> str:
    with httpx.Client(base_url=live_url, headers=admin_headers()) as admin:
        tenant = admin.post("/admin/api/tenants", json={"name": "acme"}).json()
        key = admin.post(f"/admin/api/tenants/{tenant['id']}/keys", json={"name": "cli"})
        return str(key.json()["key"])


def write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_bytes(jsonl(lines))
    return path


def batch_ids(live_url: str, key: str) -> list[str]:
    with httpx.Client(base_url=live_url, headers={"Authorization": f"Bearer {key}"}) as http:
        return [b["id"] for b in http.get("/v1/batches").json()["data"]]


def new_batch(live_url: str, key: str, seen: list[str]) -> str:
    """The id of the batch the CLI just created (one not in ``seen``)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        fresh = [i for i in batch_ids(live_url, key) if i not in seen]
        if fresh:
            return fresh[0]
        time.sleep(0.05)
    raise AssertionError("the CLI created no batch")


CreateAndWait = Callable[[list[str], dict[str, str]], tuple[subprocess.CompletedProcess[str], str]]


@pytest.fixture
def create_and_wait(live_url: str, run_batch: Callable[..., str], tmp_path: Path) -> CreateAndWait:
    """``create_and_wait(args, env) -> (result, batch id)``: ``loramux batches create ARGS
    --wait`` in ``tmp_path``, with the batch run here while the CLI waits."""

    def run(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], str]:
        key = env["LORAMUX_API_KEY"]
        seen = batch_ids(live_url, key)
        command = [LORAMUX, "batches", "create", *args, "--wait"]
        process = subprocess.Popen(
            command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            batch_id = new_batch(live_url, key, seen)
            assert run_batch(batch_id) == "completed"
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), batch_id

    return run


def custom_ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines()]


def test_every_line_failed_exits_1_and_saves_the_errors(  # type: ignore[no-untyped-def]
    live_url, tenant_key, create_and_wait, tmp_path
) -> None:
    lines = [request_line(f"r{i}", {"model": "nobody-has-this", **PROMPT}) for i in range(3)]
    path = write_lines(tmp_path / "in.jsonl", lines)
    result, batch_id = create_and_wait([str(path)], tenant_env(live_url, tenant_key))
    assert result.returncode == 1, result.stderr
    assert f"batch {batch_id}: completed" in result.stdout
    assert "3 total, 0 completed, 3 failed" in result.stdout
    errors = tmp_path / f"{batch_id}_errors.jsonl"
    assert custom_ids(errors) == ["r0", "r1", "r2"]
    assert f"to {errors.name}" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: 3 of 3 requests failed"
    # Not a terminal: plain progress lines, never a bar redrawn in place.
    assert "\r" not in result.stderr
    assert f"{batch_id}: 100% 3/3 requests (0 completed, 3 failed) completed" in result.stderr


def test_create_wait_list_get_download_and_cancel(  # type: ignore[no-untyped-def]
    live_url, tenant_key, create_and_wait, app_state, tmp_path
) -> None:
    env = tenant_env(f"{live_url}/v1", tenant_key)  # as the OpenAI SDK's base_url is written
    good = {"model": app_state.base_model_id, **PROMPT}
    path = write_lines(tmp_path / "in.jsonl", [request_line("a", good), request_line("b", good)])
    out = tmp_path / "out.jsonl"
    ok, ok_id = create_and_wait([str(path), "--output", str(out), "--json"], env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["status"] == "completed" and custom_ids(out) == ["a", "b"]
    assert not (tmp_path / f"{ok_id}_errors.jsonl").exists()

    mixed_lines = [request_line("c", good), request_line("d", {**good, "model": "nope"})]
    mixed_path = write_lines(tmp_path / "mixed.jsonl", mixed_lines)
    errors = tmp_path / "mixed-errors.jsonl"
    mixed, mixed_id = create_and_wait([str(mixed_path), "--errors", str(errors)], env)
    assert mixed.returncode == 1 and "error: 1 of 2 requests failed" in mixed.stderr
    assert custom_ids(errors) == ["d"]

    table = loramux(["batches", "list"], env).stdout.splitlines()
    assert table[0].split()[:5] == ["ID", "STATUS", "ENDPOINT", "DONE", "FAILED"]
    assert [row.split()[:5] for row in table[1:]] == [
        [mixed_id, "completed", "/v1/completions", "2/2", "1"],
        [ok_id, "completed", "/v1/completions", "2/2", "0"],
    ]
    listed = json.loads(loramux(["batches", "list", "--limit", "1", "--json"], env).stdout)
    assert listed["object"] == "list" and [b["id"] for b in listed["data"]] == [mixed_id]
    assert listed["has_more"] is True
    shown = loramux(["batches", "get", mixed_id], env).stdout
    assert "1 completed, 1 failed" in shown

    fetched = loramux(["batches", "download", mixed_id], env, cwd=tmp_path)
    assert fetched.returncode == 0, fetched.stderr
    assert custom_ids(tmp_path / f"{mixed_id}_output.jsonl") == ["c"]
    assert custom_ids(tmp_path / f"{mixed_id}_errors.jsonl") == ["d"]
    piped = loramux(["batches", "download", ok_id, "--output", "-"], env)
    assert [json.loads(line)["custom_id"] for line in piped.stdout.splitlines()] == ["a", "b"]
    no_errors = loramux(["batches", "download", ok_id, "--errors", str(tmp_path / "e")], env)
    assert_fails_in_one_line(no_errors, f"batch {ok_id} has no error file")

    pending = json.loads(loramux(["batches", "create", str(path), "--json"], env).stdout)
    cancelled = loramux(["batches", "cancel", pending["id"], "--json"], env)
    assert json.loads(cancelled.stdout)["status"] == "cancelling"
    unknown = loramux(["batches", "cancel", "batch_nope"], env)
    assert_fails_in_one_line(unknown, f"POST {live_url}/v1/batches/batch_nope/cancel answered 404")


def test_create_checks_the_key_before_sending_the_file(  # type: ignore[no-untyped-def]
    live_url, tmp_path
) -> None:
    path = write_lines(tmp_path / "in.jsonl", [request_line("a", {"model": "m", **PROMPT})])
    env = tenant_env(live_url, "lmx_not-a-real-key-0000000000")
    result = loramux(["batches", "create", str(path), "--wait"], env)
    assert_fails_in_one_line(result, f"GET {live_url}/v1/batches?limit=1 answered 401")
    assert "uploading" not in result.stderr
