"""`loramux serve` (the embedded default) killed while a version is validating: after a
restart the version ends ``ready`` within the validation timeouts, no worker or beat of the
dead server is left running, and cleanup leaves no blob behind once the adapter is deleted.

The worker is stopped before the upload, so the version is still validating when the
server is killed with it (as a container or an OOM kill takes both). The embedded SQLite
broker keeps a message a worker has taken, invisible, and never delivers it again; the test
leaves the message in that state, as a worker killed mid-validation does, so the restarted
server must publish it again itself (small validation timeouts keep that to seconds).
"""

from __future__ import annotations

import os
import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import httpx

from loramux.db.models import AdapterVersion
from loramux.db.session import make_engine, make_session_factory
from tests.e2e.conftest import LiveServer, start_server
from tests.e2e.test_serve_lifecycle import alive, children_of
from tests.e2e.test_shutdown import cmdline, descendants, wait_until
from tests.engine.peft_reference import load_base, save_random_adapter
from tests.platform.adapters.helpers import bearer, upload, wait_validated

WAIT_S = 120.0
# Attempts every 2, 4, 8, 16, 32 s: the restarted worker has two minutes to start.
FAST_VALIDATION = {
    "LORAMUX_ADAPTER_VALIDATION_TIMEOUT_S": "2",
    "LORAMUX_ADAPTER_VALIDATION_MAX_ATTEMPTS": "6",
    "LORAMUX_ADAPTER_VALIDATION_DISPATCH_INTERVAL_S": "0.5",
    "LORAMUX_CLEANUP_INTERVAL_S": "1",
}


def serve(run_dir: Path, env: dict[str, str]) -> LiveServer:
    run_dir.mkdir()
    return start_server(run_dir, env)


def attempts(home: Path, version_id: str) -> int:
    engine = make_engine(f"sqlite:///{home / 'registry.db'}")
    try:
        with make_session_factory(engine)() as session:
            version = session.get(AdapterVersion, version_id)
            assert version is not None
            return version.validation_attempts
    finally:
        engine.dispose()


def stored_files(home: Path) -> set[str]:
    root = home / "storage"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


def test_a_validation_cut_by_a_killed_server_finishes_after_restart(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    home = tmp_path / "home"
    env = {"LORAMUX_HOME": str(home), "LORAMUX_MODEL": str(tiny_llama_dir), **FAST_VALIDATION}
    adapter_dir, _ = save_random_adapter(
        load_base(tiny_llama_dir), tmp_path / "adapter", seed=3, std=0.02,
        target_modules=["q_proj", "v_proj"],
    )  # fmt: skip

    first = serve(tmp_path / "first", env)
    pid = first.process.pid
    children: list[int] = []
    try:
        wait_until(lambda: len(descendants(pid)) >= 2, "the worker and beat never both started")
        children = descendants(pid)
        workers = [p for p in children if " worker " in cmdline(p)]
        others = [p for p in children if p not in workers]
        assert workers and others, [cmdline(p) for p in children]
        for worker in workers:
            os.kill(worker, signal.SIGSTOP)  # it never gets to the message
        _, key = first.make_tenant("acme")
        with httpx.Client(base_url=first.base_url, timeout=30) as http:
            response = upload(http, key, "bot", adapter_dir)
        assert response.status_code == 201, response.text
        version_id, sha256 = response.json()["version_id"], response.json()["sha256"]
        wait_until(lambda: attempts(home, version_id) >= 1, "the validation was never published")

        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=WAIT_S)
        for worker in workers:
            os.kill(worker, signal.SIGKILL)
        published = attempts(home, version_id)
        wait_until(lambda: not any(alive(p) for p in others), "beat outlived the killed server")
    finally:
        if first.process.poll() is None:
            first.process.kill()
        kill_leftovers(children)
    # The message as a worker killed mid-validation leaves it: taken, never delivered again.
    with closing(sqlite3.connect(home / "broker.db", timeout=10)) as broker, broker:
        assert broker.execute("UPDATE kombu_message SET visible = 0").rowcount >= 1

    second = serve(tmp_path / "second", env)
    pid = second.process.pid
    try:
        with httpx.Client(base_url=second.base_url, timeout=30) as http:
            shown = wait_validated(http, key, "bot", timeout_s=WAIT_S)
            assert shown["status"] == "ready", shown
            assert attempts(home, version_id) > published, "ready without being published again"
            assert stored_files(home) == {
                f"adapters/{sha256}/adapter_config.json",
                f"adapters/{sha256}/adapter_model.safetensors",
            }
            assert http.delete("/v1/adapters/bot", headers=bearer(key)).status_code == 200
            wait_until(lambda: not stored_files(home), "cleanup left the deleted adapter's blobs")
        children = descendants(pid)
        assert children, "the restarted server has no embedded worker"
        second.process.send_signal(signal.SIGTERM)
        second.process.wait(timeout=WAIT_S)
        wait_until(lambda: not any(alive(p) for p in children), "a worker outlived the server")
    finally:
        if second.process.poll() is None:
            second.process.kill()
        kill_leftovers(descendants(pid) + children_of(pid))
