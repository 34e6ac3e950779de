"""``loramux adapters push`` and curl against a live HTTP server, with the real worker."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from loramux.app import build_state, create_app
from loramux.settings import Settings
from tests.platform.adapters.crafted import PICKLE_BYTES, altered_weights
from tests.platform.adapters.helpers import CONFIG, WEIGHTS, bearer

CLI_TIMEOUT_S = 120


@pytest.fixture
def live_url(settings: Settings) -> Iterator[str]:
    """The app served by uvicorn on a free port, in a thread."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(settings, app_state=build_state(settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        thread.join(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def run_push(url: str, secret: str, directory: Path, name: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMUX_")}
    env.update(LORAMUX_BASE_URL=url, LORAMUX_API_KEY=secret)
    command = [sys.executable, "-m", "loramux.cli", "adapters", "push", str(directory)]
    return subprocess.run(
        [*command, "--name", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def test_push_uploads_shows_progress_and_waits_for_ready(  # type: ignore[no-untyped-def]
    live_url, make_tenant, peft_adapter_dir, client
) -> None:
    _, secret = make_tenant("acme")
    result = run_push(live_url, secret, peft_adapter_dir, "cli-bot")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100%" in result.stderr and "pushing cli-bot" in result.stderr
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
