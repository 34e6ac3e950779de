"""``loramux serve``: migrate the registry, optionally make demo keys, and serve HTTP."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import secrets
import socket
import sys
from typing import Any

import uvicorn
from pydantic import SecretStr
from sqlalchemy import select, update

from loramux import tenancy
from loramux.adapters.merged_serving import (
    MergedAdapterError,
    MergedServing,
    merged_adapter_from_settings,
)
from loramux.app import build_state, create_app
from loramux.base_models import ModelError
from loramux.db.migrate import upgrade
from loramux.db.models import ApiKey, Tenant
from loramux.db.session import make_engine, make_session_factory, transaction
from loramux.drain import Drain
from loramux.engine_client import EngineClient, engine_client_from_settings
from loramux.jobs.embedded import EmbeddedWorker
from loramux.logging_config import configure_logging
from loramux.settings import Settings, get_settings
from loramux.storage import Storage, storage_from_settings
from loramux_engine.errors import EngineConfigError, ModelLoadError

DEMO_TENANT = "demo"
DEMO_KEY_NAME = "make-serve"
# After the grace, the time requests ended by the drain have to send their last event and
# write their usage before uvicorn cancels whatever is left.
DRAIN_MARGIN_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, ending requests still in flight when the shutdown grace runs out."""

    def __init__(self, config: uvicorn.Config, drain: Drain, grace_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().call_later(self.grace_s, self.drain.expire)
        await super().shutdown(sockets)


def bootstrap_demo(settings: Settings) -> tuple[str, str]:
    """Fresh admin and demo-tenant keys for local use; the previous pair is revoked."""
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            session.execute(
                update(ApiKey)
                .where(ApiKey.name == DEMO_KEY_NAME, ApiKey.revoked_at.is_(None))
                .values(revoked_at=ApiKey.created_at)
            )
            tenant = session.scalar(select(Tenant).where(Tenant.name == DEMO_TENANT))
            if tenant is None:
                tenant = tenancy.create_tenant(session, DEMO_TENANT, {}, actor="serve")
            _, admin_secret = tenancy.create_key(
                session, None, name=DEMO_KEY_NAME, scopes=["admin"], actor="serve"
            )
            _, tenant_secret = tenancy.create_key(
                session, tenant, name=DEMO_KEY_NAME, scopes=None, actor="serve"
            )
    finally:
        engine.dispose()
    return admin_secret, tenant_secret


def _engine_client(settings: Settings, storage: Storage) -> EngineClient:
    if settings.engine_backend == "ray":  # the engine deployment of a running Serve app
        try:
            from loramux.ray_engine import connect
        except ImportError as error:
            raise ImportError(
                f"{error}; the ray backend needs pip install 'loramux[ray]'"
            ) from error
        return connect(settings)
    return engine_client_from_settings(settings, storage)


def main(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {
        k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None
    }
    if get_settings().admin_key is None:
        # Workers reach this server's engine with an admin key; without a configured one,
        # this run makes a random one that only its own workers are given.
        overrides["admin_key"] = SecretStr("lmx_internal-" + secrets.token_urlsafe(32))
    settings = get_settings().model_copy(update=overrides)
    configure_logging(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    if args.demo:
        admin_secret, tenant_secret = bootstrap_demo(settings)
        print("loramux demo keys (shown once; a restart makes new ones):")
        print(f"  admin key:        {admin_secret}")
        print(f"  demo tenant key:  {tenant_secret}")
        print(
            f'  try: curl -H "Authorization: Bearer {tenant_secret}" '
            f"http://{settings.host}:{settings.port}/v1/models",
            flush=True,
        )
    if args.ray:
        if settings.merged_adapter is not None:
            print(
                "error: LORAMUX_MERGED_ADAPTER serves from the server's own engine; "
                "run `loramux serve` without --ray",
                file=sys.stderr,
            )
            return 1
        from loramux.commands.serve_ray import serve_on_ray

        return serve_on_ray(settings)
    storage = storage_from_settings(settings)
    merged: MergedServing | None = None
    try:
        if settings.merged_adapter is not None:  # a dedicated deployment of one adapter
            merged, adapter_dir = merged_adapter_from_settings(settings, storage)
            engine = engine_client_from_settings(settings, storage, merged_adapter=adapter_dir)
            print(f"serving {merged.adapter_name} v{merged.version} merged", file=sys.stderr)
        else:
            engine = _engine_client(settings, storage)
    except (
        ModelError, EngineConfigError, ModelLoadError, ImportError, MergedAdapterError
    ) as error:  # fmt: skip
        print(f"error: cannot start the engine: {error}", file=sys.stderr)
        return 1
    app_state = build_state(settings, storage=storage, engine=engine)
    app_state.merged = merged
    if settings.broker_url is None:
        # The embedded default: a worker of our own on the SQLite broker, stopped with us.
        worker = EmbeddedWorker(settings)
        worker.start()
        app_state.shutdown_hooks.append(worker.stop)
    config = uvicorn.Config(
        create_app(settings, app_state=app_state),
        host=settings.host,
        port=settings.port,
        log_config=None,  # configure_logging's handler and format for uvicorn's lines too
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s + DRAIN_MARGIN_S),
    )
    server = DrainingServer(config, app_state.drain, settings.shutdown_grace_s)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 1
