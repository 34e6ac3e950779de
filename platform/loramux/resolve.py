"""The one place that turns a request's ``model`` into what the engine serves.

``model`` is the base model's id, an adapter name (its newest ready version) or
``name@N``; it is looked up within the caller's tenant only, so another tenant's adapter
is indistinguishable from one that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from loramux.api.params import ascii_int
from loramux.db.models import Adapter, AdapterVersion
from loramux.db.scoped import scoped
from loramux.errors import InvalidRequest, NotFound
from loramux_engine.lora.ref import AdapterRef


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    model: str
    adapter: AdapterRef | None = None
    adapter_version_id: str | None = None


def model_not_found(model: str) -> NotFound:
    return NotFound(
        f"The model '{model}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def resolve_model(
    session: Session, tenant_id: str, model: str, base_model_id: str
) -> ResolvedModel:
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required", param="model")
    if model == base_model_id:
        return ResolvedModel(model)
    name, _, version_text = model.partition("@")
    adapter = session.scalars(scoped(Adapter, tenant_id).where(Adapter.name == name)).first()
    if adapter is None:
        raise model_not_found(model)
    versions = scoped(AdapterVersion, tenant_id).where(AdapterVersion.adapter_id == adapter.id)
    if version_text:
        number = ascii_int(version_text)
        if number is None:
            raise model_not_found(model)
        version = session.scalars(versions.where(AdapterVersion.version == number)).first()
        if version is None:
            raise model_not_found(model)
        _require_ready(model, version)
    else:
        version = session.scalars(
            versions.where(AdapterVersion.status == "ready").order_by(AdapterVersion.version.desc())
        ).first()
        if version is None:
            latest = session.scalars(versions.order_by(AdapterVersion.version.desc())).first()
            if latest is None:
                raise model_not_found(model)
            _require_ready(model, latest)  # raises: no version is ready
            raise AssertionError("unreachable")
    # The tenant is the ref's namespace: the engine's cache never shares an adapter (or
    # tells that it holds one) across tenants, even for identical bytes.
    ref = AdapterRef(version.id, version.sha256, namespace=tenant_id)
    return ResolvedModel(model, ref, version.id)


def _require_ready(model: str, version: AdapterVersion) -> None:
    if version.status == "ready":
        return
    if version.status == "rejected":
        raise InvalidRequest(
            f"The adapter '{model}' was rejected at validation: {version.reason}",
            param="model",
            code="model_rejected",
        )
    raise InvalidRequest(
        f"The adapter '{model}' is still {version.status}; retry once it is ready.",
        param="model",
        code="model_not_ready",
    )


def ready_adapters(session: Session, tenant_id: str) -> list[tuple[Adapter, AdapterVersion]]:
    """The caller's adapters that have a ready version, each with its newest ready one."""
    rows = session.execute(
        select(Adapter, AdapterVersion)
        .join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
        .where(Adapter.tenant_id == tenant_id, Adapter.deleted_at.is_(None))
        .where(AdapterVersion.status == "ready")
        .order_by(Adapter.name, AdapterVersion.version.desc())
    ).all()
    newest: dict[str, tuple[Adapter, AdapterVersion]] = {}
    for adapter, version in rows:
        newest.setdefault(adapter.id, (adapter, version))
    return list(newest.values())
