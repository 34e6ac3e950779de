"""A live `loramux serve` subprocess on a free port, as a user would run it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.services import fresh_pg_database

ADMIN_KEY = "lmx_e2e-admin-key-0123456789abcdef"
LORAMUX = str(Path(sys.executable).with_name("loramux"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    base_url: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
        )

    def make_tenant(self, name: str, **quotas: Any) -> tuple[dict[str, Any], str]:
        with self.admin() as admin:
            tenant = admin.post("/admin/api/tenants", json={"name": name, **quotas})
            tenant.raise_for_status()
            key = admin.post(f"/admin/api/tenants/{tenant.json()['id']}/keys", json={"name": "e2e"})
            key.raise_for_status()
            return tenant.json(), key.json()["key"]


def start_server(tmp: Path, env_overrides: dict[str, str]) -> LiveServer:
    port = free_port()
    env = {
        **os.environ,
        "LORAMUX_HOME": str(tmp / "home"),
        "LORAMUX_ADMIN_KEY": ADMIN_KEY,
        "LORAMUX_PORT": str(port),
        **env_overrides,
    }
    log = tmp / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [LORAMUX, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"loramux serve exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return LiveServer(base_url, env, process, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"loramux serve did not become ready:\n{log.read_text()}")


@pytest.fixture(scope="module")
def live_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[dict[str, str]], LiveServer]]:
    servers: list[LiveServer] = []

    def make(env: dict[str, str]) -> LiveServer:
        server = start_server(tmp_path_factory.mktemp("serve"), env)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.process.terminate()
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()


@pytest.fixture(scope="module")
def live_server(
    live_server_factory: Callable[[dict[str, str]], LiveServer], tiny_llama_dir: Path
) -> Iterator[LiveServer]:
    """`loramux serve` on the tiny model and a PostgreSQL registry of its own."""
    with fresh_pg_database() as url:
        yield live_server_factory(
            {
                "LORAMUX_MODEL": str(tiny_llama_dir),
                "LORAMUX_DATABASE_URL": url,
                "LORAMUX_RATE_LIMIT_WINDOW_S": "3",
            }
        )
