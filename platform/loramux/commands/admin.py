"""Registry commands run straight against the database: db, tenants, keys."""

from __future__ import annotations

import argparse
import json
import sys

from loramux import tenancy
from loramux.db.migrate import upgrade
from loramux.db.session import make_engine, make_session_factory, transaction
from loramux.errors import APIError
from loramux.settings import get_settings

ACTOR = "cli"


def _sessions():  # type: ignore[no-untyped-def]
    return make_session_factory(make_engine(get_settings().resolved_database_url))


def _fail(error: APIError) -> int:
    print(f"error: {error.message}", file=sys.stderr)
    return 1


def db_upgrade(_args: argparse.Namespace) -> int:
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    print("registry is at the newest schema")
    return 0


def tenants_create(args: argparse.Namespace) -> int:
    try:
        with transaction(_sessions()) as session:
            view = tenancy.tenant_view(tenancy.create_tenant(session, args.name, {}, actor=ACTOR))
    except APIError as error:
        return _fail(error)
    print(json.dumps(view) if args.json else f"created tenant {view['name']} ({view['id']})")
    return 0


def keys_create(args: argparse.Namespace) -> int:
    try:
        with transaction(_sessions()) as session:
            tenant = tenancy.get_tenant(session, args.tenant)
            key, secret = tenancy.create_key(
                session, tenant, name=args.name, scopes=args.scopes, actor=ACTOR
            )
            view = {**tenancy.key_view(key), "key": secret}
    except APIError as error:
        return _fail(error)
    if args.json:
        print(json.dumps(view))
    else:
        scopes = " ".join(view["scopes"])
        print(f"created key {view['id']} for tenant {args.tenant} (scopes: {scopes})")
        print(f"secret (shown once): {secret}")
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    try:
        with transaction(_sessions()) as session:
            key = tenancy.revoke_key(session, args.id, actor=ACTOR)
    except APIError as error:
        return _fail(error)
    print(f"revoked key {key.id}")
    return 0
