"""The registry commands, run as a user runs them: the `loramux` executable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from loramux.db.models import ApiKey, AuditLog

LORAMUX = str(Path(sys.executable).with_name("loramux"))


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORAMUX, *args], env=env, capture_output=True, text=True, timeout=120)


def test_tenant_and_key_commands(pg_database: str, db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "LORAMUX_HOME": str(tmp_path), "LORAMUX_DATABASE_URL": pg_database}
    assert run(["db", "upgrade"], env).returncode == 0
    tenant = run(["tenants", "create", "acme", "--json"], env)
    assert tenant.returncode == 0, tenant.stderr
    assert json.loads(tenant.stdout)["name"] == "acme"

    duplicate = run(["tenants", "create", "acme"], env)
    assert duplicate.returncode == 1
    assert "already exists" in duplicate.stderr and "Traceback" not in duplicate.stderr

    key = run(["keys", "create", "--tenant", "acme", "--scopes", "inference", "--json"], env)
    assert key.returncode == 0, key.stderr
    created = json.loads(key.stdout)
    assert created["key"].startswith("lmx_") and created["scopes"] == ["inference"]

    bad_scope = run(["keys", "create", "--tenant", "acme", "--scopes", "root"], env)
    assert bad_scope.returncode == 1 and "unknown scope 'root'" in bad_scope.stderr

    assert run(["keys", "revoke", created["id"]], env).returncode == 0
    with db() as session:
        keys = session.scalars(select(ApiKey)).all()
        assert len(keys) == 1 and keys[0].revoked_at is not None
        actions = [a.action for a in session.scalars(select(AuditLog).order_by(AuditLog.id))]
        assert actions == ["tenant.create", "key.create", "key.revoke"]
        assert {a.actor for a in session.scalars(select(AuditLog))} == {"cli"}
