"""Run the ``loramux`` executable as a tenant runs it: a fresh process, an environment with
only the LORAMUX_* settings given, its output captured (so not a terminal)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LORAMUX = str(Path(sys.executable).with_name("loramux"))
TIMEOUT_S = 120  # far above what any command here takes; reached only when one hangs


def tenant_env(base_url: str, api_key: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMUX_")}
    return {**env, "LORAMUX_BASE_URL": base_url, "LORAMUX_API_KEY": api_key, **settings}


def loramux(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LORAMUX, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def assert_fails_in_one_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit status 1, and stderr one ``error:`` line (no traceback) holding each needle."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], result.stderr
    return lines[0]
