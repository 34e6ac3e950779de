"""A dedicated deployment of one hot adapter, merged into the base (LORAMUX_MERGED_ADAPTER).

The setting names a ready adapter version: ``<tenant>/<adapter>`` (its newest ready
version when the server starts), ``<tenant>/<adapter>@<N>``, or a version id
(``adv_...``). At start the server pins that version, fetches its two files (checked
against its sha256) and has the engine load the base with it merged
(``EngineConfig.merged_adapter``): no slot pool and no LoRA op in any step.

The engine then computes that adapter and nothing else, so the deployment serves exactly
one thing: the owning tenant's requests for the adapter's name (or ``name@N`` of the
pinned version), run as plain base-model sequences and billed to that version. The base
model's id and every other adapter, whoever asks, are a 400 ``model_not_served``: an answer
from the merged weights under another name would be wrong, and the message names nothing
of another tenant's. Send those to a modular deployment.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loramux.api.params import ascii_int
from loramux.db.models import Adapter, AdapterVersion, Tenant
from loramux.db.session import make_engine, make_session_factory
from loramux.errors import InvalidRequest
from loramux.resolve import ResolvedModel, model_not_found, resolve_model
from loramux.settings import Settings
from loramux.storage import Storage, adapter_key
from loramux_engine.lora.files import ADAPTER_FILES
from loramux_engine.lora.ref import combine_file_digests


class MergedAdapterError(ValueError):
    """LORAMUX_MERGED_ADAPTER names no ready adapter version; the message says why."""


@dataclass(frozen=True, slots=True)
class MergedServing:
    """The pinned adapter version a merged deployment serves."""

    tenant_id: str
    adapter_id: str
    adapter_name: str
    version_id: str
    version: int
    sha256: str

    def serves(self, tenant_id: str, model: str) -> bool:
        return tenant_id == self.tenant_id and model in (
            self.adapter_name,
            f"{self.adapter_name}@{self.version}",
        )


def resolve_merged_adapter(session: Session, spec: str) -> MergedServing:
    """The ready, live adapter version ``spec`` names (see the module's docstring)."""
    spec = spec.strip()
    query = (
        select(AdapterVersion, Adapter)
        .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .where(Adapter.deleted_at.is_(None))
    )
    if "/" not in spec:
        query = query.where(AdapterVersion.id == spec)
    else:
        tenant_name, _, model = spec.partition("/")
        name, _, version_text = model.partition("@")
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant_name))
        if tenant_id is None:
            raise MergedAdapterError(f"LORAMUX_MERGED_ADAPTER: no tenant {tenant_name!r}")
        query = query.where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        if version_text:
            number = ascii_int(version_text)
            if number is None:
                raise MergedAdapterError(f"LORAMUX_MERGED_ADAPTER: bad version {version_text!r}")
            query = query.where(AdapterVersion.version == number)
        else:
            query = query.where(AdapterVersion.status == "ready")
    row = session.execute(query.order_by(AdapterVersion.version.desc())).first()
    if row is None:
        raise MergedAdapterError(f"LORAMUX_MERGED_ADAPTER: no ready adapter version {spec!r}")
    version, adapter = row
    if version.status != "ready":
        raise MergedAdapterError(
            f"LORAMUX_MERGED_ADAPTER: version {version.version} of {adapter.name!r} is "
            f"{version.status}, not ready"
        )
    return MergedServing(
        tenant_id=adapter.tenant_id,
        adapter_id=adapter.id,
        adapter_name=adapter.name,
        version_id=version.id,
        version=version.version,
        sha256=version.sha256,
    )


def fetch_merged_adapter(storage: Storage, served: MergedServing, root: Path) -> Path:
    """The version's two files under ``root/<sha256>/``, checked against its sha256."""
    dest = root / served.sha256
    work = root / f".{served.sha256}.part"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    digests = [
        storage.download_to(adapter_key(served.sha256, name), work / name, expected_sha256=None)
        for name in ADAPTER_FILES
    ]
    if combine_file_digests(*(bytes.fromhex(d.sha256) for d in digests)) != served.sha256:
        shutil.rmtree(work, ignore_errors=True)
        raise MergedAdapterError("LORAMUX_MERGED_ADAPTER: the stored files do not match")
    shutil.rmtree(dest, ignore_errors=True)
    work.rename(dest)
    return dest


def merged_adapter_from_settings(
    settings: Settings, storage: Storage
) -> tuple[MergedServing, Path]:
    """Pin the version LORAMUX_MERGED_ADAPTER names and fetch it under home/merged-adapters."""
    if settings.merged_adapter is None:
        raise MergedAdapterError("LORAMUX_MERGED_ADAPTER is not set")
    if settings.engine_backend != "local":
        raise MergedAdapterError(
            "LORAMUX_MERGED_ADAPTER serves from the server's own engine "
            "(LORAMUX_ENGINE_BACKEND=local)"
        )
    db_engine = make_engine(settings.resolved_database_url)
    try:
        sessions: sessionmaker[Session] = make_session_factory(db_engine)
        with sessions() as session:
            served = resolve_merged_adapter(session, settings.merged_adapter)
    finally:
        db_engine.dispose()
    return served, fetch_merged_adapter(storage, served, settings.home / "merged-adapters")


def resolve_served_model(
    session: Session,
    tenant_id: str,
    model: str,
    base_model_id: str,
    merged: MergedServing | None,
) -> ResolvedModel:
    """``resolve_model`` for this deployment: in merged mode only the merged adapter."""
    if merged is None:
        return resolve_model(session, tenant_id, model, base_model_id)
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required", param="model")
    if merged.serves(tenant_id, model):
        live = session.scalar(
            select(Adapter.id).where(Adapter.id == merged.adapter_id, Adapter.deleted_at.is_(None))
        )
        if live is None:
            raise model_not_found(model)
        return ResolvedModel(model, None, merged.version_id)
    owner = tenant_id == merged.tenant_id
    raise InvalidRequest(
        "This deployment serves one merged adapter only"
        + (f" ({merged.adapter_name!r}, version {merged.version})" if owner else "")
        + f"; '{model}' is served by the modular deployment.",
        param="model",
        code="model_not_served",
    )
