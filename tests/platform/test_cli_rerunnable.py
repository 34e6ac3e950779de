"""The flags that let the README's examples run twice: ``tenants create --if-not-exists``
and ``keys revoke --tenant T --name N``, run as the ``loramux`` executable on a fresh
embedded home (``batches create --quiet`` is in tests/platform/batches/)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sqlalchemy import select

from loramux.db.models import ApiKey, AuditLog
from loramux.db.session import make_engine, make_session_factory
from tests.platform.cli_runner import assert_fails_in_one_line, loramux


def home_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMUX_")}
    return {**env, "LORAMUX_HOME": str(home)}


def audit_actions(home: Path) -> list[str]:
    engine = make_engine(f"sqlite:///{home / 'registry.db'}")
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(AuditLog.action).order_by(AuditLog.id)))
    finally:
        engine.dispose()


def key_states(home: Path) -> dict[str, bool]:
    """Each key's id: whether it is revoked."""
    engine = make_engine(f"sqlite:///{home / 'registry.db'}")
    try:
        with make_session_factory(engine)() as session:
            return {k.id: k.revoked_at is not None for k in session.scalars(select(ApiKey))}
    finally:
        engine.dispose()


def test_tenants_create_if_not_exists_keeps_the_tenant_there_is(tmp_path: Path) -> None:
    env = home_env(tmp_path)
    first = loramux(["tenants", "create", "acme", "--if-not-exists", "--json"], env)
    assert first.returncode == 0, first.stderr
    created = json.loads(first.stdout)

    again = loramux(["tenants", "create", "acme", "--if-not-exists", "--json"], env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == created
    text = loramux(["tenants", "create", "acme", "--if-not-exists"], env)
    assert text.stdout.strip() == f"tenant exists: acme ({created['id']})"

    assert_fails_in_one_line(loramux(["tenants", "create", "acme"], env), "already exists")
    assert audit_actions(tmp_path) == ["tenant.create"]


def test_keys_revoke_by_tenant_and_name_revokes_those_keys_only(tmp_path: Path) -> None:
    env = home_env(tmp_path)
    for tenant in ("acme", "globex"):
        assert loramux(["tenants", "create", tenant], env).returncode == 0

    def create(tenant: str, name: str) -> str:
        made = loramux(["keys", "create", "--tenant", tenant, "--name", name, "--json"], env)
        assert made.returncode == 0, made.stderr
        return str(json.loads(made.stdout)["id"])

    ci = [create("acme", "ci"), create("acme", "ci")]
    others = [create("acme", "default"), create("globex", "ci")]

    revoked = loramux(["keys", "revoke", "--tenant", "acme", "--name", "ci"], env)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.splitlines() == [f"revoked key {key_id}" for key_id in ci]
    states = key_states(tmp_path)
    assert [states[k] for k in ci] == [True, True]
    assert [states[k] for k in others] == [False, False]

    again = loramux(["keys", "revoke", "--tenant", "acme", "--name", "ci"], env)
    assert again.returncode == 0, again.stderr
    assert "already revoked" in again.stdout
    assert audit_actions(tmp_path).count("key.revoke") == 2

    typo = loramux(["keys", "revoke", "--tenant", "acme", "--name", "cj"], env)
    assert_fails_in_one_line(typo, "tenant acme has no key named 'cj'")
    assert_fails_in_one_line(
        loramux(["keys", "revoke", "--tenant", "nope", "--name", "ci"], env), "no tenant 'nope'"
    )
    for args in ([], ["--tenant", "acme"], [others[0], "--tenant", "acme", "--name", "ci"]):
        wrong = loramux(["keys", "revoke", *args], env)
        assert_fails_in_one_line(wrong, "give a key's id, or both --tenant and --name")
    assert key_states(tmp_path)[others[0]] is False

    by_id = loramux(["keys", "revoke", others[0]], env)
    assert by_id.returncode == 0 and by_id.stdout.strip() == f"revoked key {others[0]}"
