"""A Celery worker started by ``loramux serve`` for the embedded default (SQLite broker).

It runs as a child process of the server, with the server's settings in its environment,
the solo pool and an embedded beat for the periodic cleanup; it stops with the server.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

from pydantic import SecretStr

from loramux.settings import Settings

PR_SET_PDEATHSIG = 1


def settings_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (the current environment by default) with ``settings`` as LORAMUX_* variables."""
    source = base if base is not None else os.environ
    env = {k: v for k, v in source.items() if not k.startswith("LORAMUX_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            secret = isinstance(value, SecretStr)
            env[f"LORAMUX_{name.upper()}"] = value.get_secret_value() if secret else str(value)
    # Settings' own properties fill in the embedded defaults the worker must agree on.
    env["LORAMUX_DATABASE_URL"] = settings.resolved_database_url
    env["LORAMUX_STORAGE_URL"] = settings.resolved_storage_url
    env["LORAMUX_BROKER_URL"] = settings.resolved_broker_url
    return env


def worker_command(*, beat_schedule: Path | None = None, loglevel: str = "INFO") -> list[str]:
    command = [
        sys.executable, "-m", "celery", "-A", "loramux.jobs.app", "worker",
        "--pool", "solo", "--concurrency", "1", "--loglevel", loglevel,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    if beat_schedule is not None:
        command += ["--beat", "--schedule", str(beat_schedule)]
    return command


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the server dies, however it dies (even SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedWorker:
    """``start()`` / ``stop()`` a worker subprocess for ``settings``."""

    def __init__(self, settings: Settings, log: IO[bytes] | None = None) -> None:
        self.settings = settings
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            worker_command(beat_schedule=self.settings.home / "celerybeat-schedule"),
            env=settings_env(self.settings),
            stdout=self.log,
            stderr=subprocess.STDOUT if self.log is not None else None,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # a warm shutdown: the current task finishes first
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
