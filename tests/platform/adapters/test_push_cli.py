"""``loramux adapters push`` and curl against a live HTTP server, with the real worker."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from loramux.app import build_state, create_app
from loramux.settings import Settings
from tests.platform.adapters.crafted import PICKLE_BYTES, altered_weights
from tests.platform.adapters.helpers import CONFIG, WEIGHTS, bearer
from tests.platform.cli_runner import assert_fails_in_one_line, loramux, tenant_env
from tests.platform.live_server import serve

CLI_TIMEOUT_S = 120


@pytest.fixture
def live_url(settings: Settings) -> Iterator[str]:
    """The app served by uvicorn on a free port, in a thread."""
    with serve(create_app(settings, app_state=build_state(settings))) as url:
        yield url


def run_push(url: str, secret: str, directory: Path, name: str) -> subprocess.CompletedProcess[str]:
    return loramux(["adapters", "push", str(directory), "--name", name], tenant_env(url, secret))


def test_push_uploads_shows_progress_and_waits_for_ready(  # type: ignore[no-untyped-def]
    live_url, make_tenant, peft_adapter_dir, client
) -> None:
    _, secret = make_tenant("acme")
    result = run_push(live_url, secret, peft_adapter_dir, "cli-bot")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pushing cli-bot: 100%" in result.stderr
    assert "\r" not in result.stderr  # not a terminal: plain lines, no bar redrawn in place
    assert "uploaded cli-bot version 1" in result.stdout
    assert "ready: use model='cli-bot'" in result.stdout
    shown = client.get("/v1/adapters/cli-bot", headers=bearer(secret)).json()
    assert shown["status"] == "ready"


def test_push_exits_1_with_the_reason_when_rejected(  # type: ignore[no-untyped-def]
    live_url, make_tenant, adapter_copy
) -> None:
    _, secret = make_tenant("acme")
    (adapter_copy / WEIGHTS).write_bytes(altered_weights(adapter_copy, "nan"))
    result = run_push(live_url, secret, adapter_copy, "nan-bot")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rejected:" in result.stdout and "NaN" in result.stdout


def test_push_refuses_a_pickle_only_directory(tmp_path: Path) -> None:
    (tmp_path / CONFIG).write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(PICKLE_BYTES)
    result = run_push("http://127.0.0.1:9", "lmx_unused-key-000000", tmp_path, "bot")
    assert result.returncode == 1
    assert "adapter_model.bin" in result.stderr and "safe_serialization=True" in result.stderr


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_upload_as_in_the_readme(  # type: ignore[no-untyped-def]
    live_url, make_tenant, peft_adapter_dir, wait_validated
) -> None:
    _, secret = make_tenant("acme")
    result = subprocess.run(
        [
            "curl", "-sS", f"{live_url}/v1/adapters",
            "-H", f"Authorization: Bearer {secret}",
            "-F", "name=curl-bot",
            "-F", f"config=@{peft_adapter_dir / CONFIG}",
            "-F", f"weights=@{peft_adapter_dir / WEIGHTS}",
        ],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=True,
    )  # fmt: skip
    body = json.loads(result.stdout)
    assert (body["name"], body["status"]) == ("curl-bot", "validating"), body
    assert wait_validated(body["version_id"]).status == "ready"


def test_a_base_url_ending_in_v1_and_the_list_get_delete_commands(  # type: ignore[no-untyped-def]
    live_url, make_tenant, peft_adapter_dir
) -> None:
    _, secret = make_tenant("acme")
    pushed = run_push(f"{live_url}/v1/", secret, peft_adapter_dir, "v1-bot")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    env = tenant_env(f"{live_url}/v1", secret)
    again = run_push(f"{live_url}/v1", secret, peft_adapter_dir, "v1-bot")
    assert "v1-bot exists (version 1); pushing a new version" in again.stderr
    assert "uploaded v1-bot version 2" in again.stdout

    table = loramux(["adapters", "list"], env).stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "VERSION", "STATUS", "SERVING"]
    assert table[1].split()[:4] == ["v1-bot", "2", "ready", "2"]
    listed = json.loads(loramux(["adapters", "list", "--json"], env).stdout)
    assert listed["object"] == "list" and [a["name"] for a in listed["data"]] == ["v1-bot"]
    shown = loramux(["adapters", "get", "v1-bot"], env).stdout
    assert "serving: version 2" in shown and "VERSION  STATUS" in shown
    got = json.loads(loramux(["adapters", "get", "v1-bot", "--json"], env).stdout)
    assert got["name"] == "v1-bot" and [v["version"] for v in got["versions"]] == [1, 2]

    deleted = loramux(["adapters", "delete", "v1-bot"], env)
    assert deleted.returncode == 0 and "deleted adapter v1-bot" in deleted.stdout
    gone = loramux(["adapters", "get", "v1-bot"], env)
    assert_fails_in_one_line(gone, f"GET {live_url}/v1/adapters/v1-bot answered 404")


def test_push_checks_the_key_the_url_and_the_name_before_sending_weights(  # type: ignore[no-untyped-def]
    live_url, make_tenant, peft_adapter_dir
) -> None:
    _, secret = make_tenant("acme")
    bad_key = run_push(live_url, "lmx_not-a-real-key-0000000000", peft_adapter_dir, "bot")
    assert_fails_in_one_line(bad_key, f"{live_url}/v1/adapters/bot answered 401")
    not_the_api = run_push(f"{live_url}/api", secret, peft_adapter_dir, "bot")
    assert_fails_in_one_line(not_the_api, "answered 404 Not Found, not loramux's API")
    # Nothing listens on port 1: the name is refused before any connection is tried.
    bad_name = run_push("http://127.0.0.1:1", secret, peft_adapter_dir, "my bot!")
    assert_fails_in_one_line(bad_name, "adapter name 'my bot!': name may hold letters")
    unreachable = run_push("http://127.0.0.1:1", secret, peft_adapter_dir, "bot")
    assert_fails_in_one_line(unreachable, "cannot reach http://127.0.0.1:1/v1/adapters/bot")
    for result in (bad_key, not_the_api, bad_name, unreachable):
        assert "pushing" not in result.stderr  # the upload never started
