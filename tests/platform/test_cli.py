"""The registry commands, run as a user runs them: the `loramux` executable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from loramux.db.migrate import is_current
from loramux.db.models import ApiKey, AuditLog
from loramux.db.session import make_engine
from tests.fixtures.services import fresh_pg_database

LORAMUX = str(Path(sys.executable).with_name("loramux"))


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORAMUX, *args], env=env, capture_output=True, text=True, timeout=120)


def user_env(home: Path, **settings: str) -> dict[str, str]:
    """A new user's environment: no LORAMUX_* but those given, so the embedded defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMUX_")}
    return {**env, "LORAMUX_HOME": str(home), **settings}


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


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


def test_registry_commands_on_a_fresh_home_migrate_the_embedded_registry(tmp_path: Path) -> None:
    home = tmp_path / "new-user" / ".loramux"  # not there yet, nor its parent
    env = user_env(home)
    tenant = run(["tenants", "create", "acme", "--json"], env)
    assert tenant.returncode == 0, tenant.stderr
    assert json.loads(tenant.stdout)["name"] == "acme"
    key = run(["keys", "create", "--tenant", "acme", "--json"], env)
    assert key.returncode == 0, key.stderr
    assert json.loads(key.stdout)["key"].startswith("lmx_")
    engine = make_engine(f"sqlite:///{home / 'registry.db'}")
    try:
        assert is_current(engine)
    finally:
        engine.dispose()


def test_a_configured_registry_that_is_not_migrated_names_db_upgrade(tmp_path: Path) -> None:
    with fresh_pg_database() as url:
        env = user_env(tmp_path, LORAMUX_DATABASE_URL=url)
        assert_one_line_error(run(["tenants", "create", "acme"], env), "loramux db upgrade")
        assert run(["db", "upgrade"], env).returncode == 0
        assert run(["tenants", "create", "acme"], env).returncode == 0


def test_an_unreachable_registry_is_one_line_without_its_password(tmp_path: Path) -> None:
    url = "postgresql+psycopg://loramux:hunter2@127.0.0.1:1/registry"
    result = run(["tenants", "create", "acme"], user_env(tmp_path, LORAMUX_DATABASE_URL=url))
    assert_one_line_error(result, "cannot use the registry at", "127.0.0.1:1")
    assert "hunter2" not in result.stderr
