"""A Celery worker and beat started by ``loramux serve`` for the embedded default.

Both run as child processes of the server, with the server's settings in their
environment: the worker on the solo pool, and beat (the periodic cleanup) beside it, not
inside it. Each gets the parent-death signal, so each stops with the server however the
server dies. Beat embedded in the worker (``worker --beat``) would be the worker's child
instead, which the kernel does not signal when the server dies: a worker still finishing
a task, wedged, or killed left it running, and orphaned beats kept scheduling tasks.
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


def beat_command(schedule: Path, *, loglevel: str = "INFO") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "loramux.jobs.app", "beat",
        "--schedule", str(schedule), "--loglevel", loglevel,
    ]  # fmt: skip


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the server dies, however it dies (even SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedWorker:
    """``start()`` / ``stop()`` the worker and beat subprocesses for ``settings``."""

    def __init__(self, settings: Settings, log: IO[bytes] | None = None) -> None:
        self.settings = settings
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.beat: subprocess.Popen[bytes] | None = None

    def _spawn(self, command: list[str]) -> subprocess.Popen[bytes]:
        # Called from the server's main thread: the parent-death signal fires when the
        # thread that spawned the child exits, and the main thread lives as long as we do.
        return subprocess.Popen(
            command,
            env=settings_env(self.settings),
            stdout=self.log,
            stderr=subprocess.STDOUT if self.log is not None else None,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def start(self) -> None:
        loglevel = self.settings.log_level
        self.process = self._spawn(worker_command(loglevel=loglevel))
        schedule = self.settings.home / "celerybeat-schedule"
        self.beat = self._spawn(beat_command(schedule, loglevel=loglevel))

    def stop(self, timeout_s: float = 15.0) -> None:
        # Beat first, so nothing new is scheduled while the worker finishes its task.
        for process in (self.beat, self.process):
            if process is None or process.poll() is not None:
                continue
            process.terminate()  # the worker's warm shutdown: the current task finishes
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
