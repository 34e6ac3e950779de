"""`loramux serve` in its embedded default owns a Celery worker, and never leaks it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import start_server


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    return (
        Path(f"/proc/{pid}").exists()
        and "Z" not in (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
    )


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_embedded_worker_stops_with_the_server(
    tmp_path: Path, tiny_llama_dir: Path, stop_signal: signal.Signals
) -> None:
    server = start_server(tmp_path, {"LORAMUX_MODEL": str(tiny_llama_dir)})  # SQLite, no broker
    workers = children_of(server.process.pid)
    assert workers, "the embedded worker was not started"
    server.process.send_signal(stop_signal)
    server.process.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers)
