"""Registry commands run straight against the database: db, tenants, keys.

The embedded SQLite registry (no ``LORAMUX_DATABASE_URL``) migrates itself on first use,
as ``loramux serve`` does, so a fresh home works at once. A configured registry is never
migrated behind the operator's back: if it is behind, the command says to run
``loramux db upgrade``. Every failure is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from alembic.util import CommandError
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from loramux import tenancy
from loramux.commands.output import Column, CommandFailed, Row, print_list, when
from loramux.db.migrate import is_current, upgrade
from loramux.db.models import ApiKey, Tenant
from loramux.db.session import make_engine, make_session_factory, transaction
from loramux.errors import APIError
from loramux.settings import get_settings

ACTOR = "cli"

Command = Callable[[argparse.Namespace], int]


class RegistryNotReady(Exception):
    """The registry cannot be used as it is; the message says what to run."""


def _shown_url() -> str:
    return make_url(get_settings().resolved_database_url).render_as_string(hide_password=True)


def _first_line(error: Exception) -> str:
    cause = error.orig if isinstance(error, DBAPIError) and error.orig else error
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


def _one_line_errors(command: Command) -> Command:
    """Turn the registry's failures into one line naming the fix, never a traceback."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except APIError as error:
            message = error.message
        except RegistryNotReady as error:
            message = str(error)
        except (SQLAlchemyError, CommandError) as error:
            message = f"cannot use the registry at {_shown_url()}: {_first_line(error)}"
        print(f"error: {message}", file=sys.stderr)
        return 1

    return run


@contextmanager
def _registry() -> Iterator[sessionmaker[Session]]:
    """Sessions on a registry at the newest schema; the embedded one is migrated here."""
    settings = get_settings()
    embedded = settings.database_url is None
    if embedded:
        settings.home.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    try:
        if not is_current(engine):
            if not embedded:
                raise RegistryNotReady(
                    f"the registry at {_shown_url()} is not migrated to this loramux's schema; "
                    "run `loramux db upgrade` first"
                )
            upgrade(settings.resolved_database_url)
        yield make_session_factory(engine)
    finally:
        engine.dispose()


@_one_line_errors
def db_upgrade(_args: argparse.Namespace) -> int:
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    print("registry is at the newest schema")
    return 0


@_one_line_errors
def tenants_create(args: argparse.Namespace) -> int:
    """Create a tenant; with ``--if-not-exists`` a tenant of that name is success, unchanged."""
    with _registry() as sessions, transaction(sessions) as session:
        existing = session.scalar(select(Tenant).where(Tenant.name == args.name))
        if existing is not None and args.if_not_exists:
            view, verb = tenancy.tenant_view(existing), "tenant exists:"
        else:
            tenant = tenancy.create_tenant(session, args.name, {}, actor=ACTOR)
            view, verb = tenancy.tenant_view(tenant), "created tenant"
    print(json.dumps(view) if args.json else f"{verb} {view['name']} ({view['id']})")
    return 0


@_one_line_errors
def keys_create(args: argparse.Namespace) -> int:
    with _registry() as sessions, transaction(sessions) as session:
        tenant = tenancy.get_tenant(session, args.tenant)
        key, secret = tenancy.create_key(
            session, tenant, name=args.name, scopes=args.scopes, actor=ACTOR
        )
        view = {**tenancy.key_view(key), "key": secret}
    if args.json:
        print(json.dumps(view))
    else:
        scopes = " ".join(view["scopes"])
        print(f"created key {view['id']} for tenant {args.tenant} (scopes: {scopes})")
        print(f"secret (shown once): {secret}")
    return 0


@_one_line_errors
def keys_revoke(args: argparse.Namespace) -> int:
    """Revoke one key by id, or every active key of ``--tenant`` named ``--name``.

    Revoking is idempotent: a key already revoked stays revoked and the command succeeds.
    A name that no key of the tenant ever had is an error, since it is most likely a typo.
    """
    by_name = args.tenant is not None or args.name is not None
    if (args.id is None) == (not by_name) or (by_name and None in (args.tenant, args.name)):
        raise CommandFailed("give a key's id, or both --tenant and --name")
    with _registry() as sessions, transaction(sessions) as session:
        if args.id is not None:
            ids = [args.id]
        else:
            tenant = tenancy.get_tenant(session, args.tenant)
            named = session.scalars(
                select(ApiKey)
                .where(ApiKey.tenant_id == tenant.id, ApiKey.name == args.name)
                .order_by(ApiKey.created_at, ApiKey.id)
            ).all()
            if not named:
                raise CommandFailed(f"tenant {args.tenant} has no key named {args.name!r}")
            ids = [key.id for key in named if key.revoked_at is None]
            if not ids:
                print(f"every key named {args.name!r} of tenant {args.tenant} is already revoked")
        revoked = [tenancy.revoke_key(session, key_id, actor=ACTOR).id for key_id in ids]
    for key_id in revoked:
        print(f"revoked key {key_id}")
    return 0


TENANT_COLUMNS: list[Column] = [
    ("ID", lambda t: t["id"]),
    ("NAME", lambda t: t["name"]),
    ("STATUS", lambda t: t["status"]),
    ("CREATED (UTC)", lambda t: when(t["created_at"])),
]
KEY_COLUMNS: list[Column] = [
    ("ID", lambda k: k["id"]),
    ("NAME", lambda k: k["name"]),
    ("PREFIX", lambda k: k["prefix"]),
    ("TENANT", lambda k: k["tenant"] or "(admin)"),
    ("SCOPES", lambda k: k["scopes"]),
    ("STATUS", lambda k: _key_status(k)),
    ("CREATED (UTC)", lambda k: when(k["created_at"])),
    ("LAST USED (UTC)", lambda k: when(k["last_used_at"])),
]


def _key_status(key: Row) -> str:
    if key["revoked_at"] is not None:
        return "revoked"
    if key["expires_at"] is not None and key["expires_at"] <= time.time():
        return "expired"
    return "active"


@_one_line_errors
def tenants_list(args: argparse.Namespace) -> int:
    with _registry() as sessions, sessions() as session:
        views = [
            tenancy.tenant_view(t) for t in session.scalars(select(Tenant).order_by(Tenant.name))
        ]
    body = {"object": "list", "data": views}
    print_list(body, TENANT_COLUMNS, as_json=args.json, empty="no tenants yet")
    return 0


@_one_line_errors
def keys_list(args: argparse.Namespace) -> int:
    """Every key (the secrets are never stored, so never shown), or one tenant's."""
    with _registry() as sessions, sessions() as session:
        query = select(ApiKey, Tenant.name).outerjoin(Tenant, ApiKey.tenant_id == Tenant.id)
        if args.tenant is not None:
            query = query.where(ApiKey.tenant_id == tenancy.get_tenant(session, args.tenant).id)
        rows = session.execute(query.order_by(ApiKey.created_at, ApiKey.id)).all()
        views = [{**tenancy.key_view(key), "tenant": tenant} for key, tenant in rows]
    body = {"object": "list", "data": views}
    print_list(body, KEY_COLUMNS, as_json=args.json, empty="no keys yet")
    return 0
