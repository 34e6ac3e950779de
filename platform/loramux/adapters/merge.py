"""Merge jobs, the API's side: request one, show it, hand out its files.

A merge folds one ready adapter version into the base model and stores the result as a
standard Hugging Face directory under ``merges/<sha256>/<file>`` (content-addressed: the
sha256 of the export's ``sha256sum`` listing; no tenant or adapter name in a key). One job
per version and base model: a second request returns the first, and a failed one is
queued again. The tenant's ``max_storage_bytes`` counts a job's bytes from the request
on (the base model's size, an upper bound of the export, reserved until the worker
records the real size), so merges and uploads share one quota.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loramux.adapters import registry
from loramux.adapters.outbox import MergeOutbox
from loramux.api.params import ascii_int
from loramux.audit import record
from loramux.base_models import ModelError, resolve_model
from loramux.db.models import Adapter, AdapterMerge, AdapterVersion
from loramux.db.scoped import scoped
from loramux.db.session import transaction
from loramux.errors import Conflict, NotFound, PermissionDenied, ServiceUnavailable
from loramux.settings import Settings
from loramux.storage import Storage, content_key
from loramux_engine.lora.merge import MODEL_FILES

MAX_VERSION_DIGITS = 9


def merge_key(sha256: str, filename: str) -> str:
    return content_key("merges", sha256, filename)


def export_files(model_dir: Path) -> list[Path]:
    """The base model's files a merged export holds (same names, same sizes but headers)."""
    files = sorted(model_dir.glob("*.safetensors"))
    return files + [model_dir / n for n in MODEL_FILES if (model_dir / n).is_file()]


def estimated_export_bytes(settings: Settings) -> int:
    try:
        model_dir = resolve_model(settings.model, settings.models_dir)
    except ModelError:
        raise ServiceUnavailable(
            "the base model is not available to merge into; retry later"
        ) from None
    return sum(path.stat().st_size for path in export_files(model_dir))


def find_version(
    session: Session, tenant_id: str, name: str, version_text: str
) -> tuple[Adapter, AdapterVersion]:
    adapter = registry.find_adapter(session, tenant_id, name)
    version = None
    number = ascii_int(version_text)
    if number is not None and len(version_text) <= MAX_VERSION_DIGITS:
        version = session.scalars(
            scoped(AdapterVersion, tenant_id).where(
                AdapterVersion.adapter_id == adapter.id,
                AdapterVersion.version == number,
            )
        ).first()
    if version is None:
        raise NotFound(
            f"the adapter {name!r} has no version {version_text!r}",
            param="version",
            code="version_not_found",
        )
    return adapter, version


def find_merge(
    session: Session, tenant_id: str, name: str, version_text: str, base_model_id: str
) -> tuple[Adapter, AdapterVersion, AdapterMerge]:
    adapter, version = find_version(session, tenant_id, name, version_text)
    merge = session.scalar(
        select(AdapterMerge).where(
            AdapterMerge.tenant_id == tenant_id,
            AdapterMerge.adapter_version_id == version.id,
            AdapterMerge.base_model_id == base_model_id,
        )
    )
    if merge is None:
        raise NotFound(
            f"version {version.version} of {name!r} has not been merged; POST to this URL to "
            "merge it",
            code="merge_not_found",
        )
    return adapter, version, merge


def request_merge(
    sessions: sessionmaker[Session],
    settings: Settings,
    base_model_id: str,
    *,
    tenant_id: str,
    actor: str,
    name: str,
    version_text: str,
) -> tuple[int, str]:
    """Queue the merge of a ready version (202), or return its job (200); (status, job id).

    The job's message goes out through the outbox: committed here as due, published in
    the background, never inside the request.
    """
    estimate = estimated_export_bytes(settings)
    with transaction(sessions) as session:
        tenant = registry.lock_tenant(session, tenant_id)
        adapter, version = find_version(session, tenant_id, name, version_text)
        if version.status != "ready":
            raise Conflict(
                f"version {version.version} of {name!r} is {version.status}; only a ready "
                "version can be merged",
                param="version",
                code="version_not_ready",
            )
        merge = session.scalar(
            select(AdapterMerge)
            .where(
                AdapterMerge.adapter_version_id == version.id,
                AdapterMerge.base_model_id == base_model_id,
            )
            .with_for_update()
        )
        if merge is not None and merge.status != "failed":
            return 200, merge.id
        if tenant.max_storage_bytes is not None:
            used = registry.storage_used(session, tenant_id)
            if used + estimate > tenant.max_storage_bytes:
                raise PermissionDenied(
                    f"the merged model takes up to {estimate} bytes, which would bring the "
                    f"tenant's storage to {used + estimate} bytes, over its limit "
                    f"(max_storage_bytes={tenant.max_storage_bytes})",
                    code="storage_quota_exceeded",
                )
        if merge is None:
            merge = AdapterMerge(
                tenant_id=tenant_id, adapter_version_id=version.id, base_model_id=base_model_id
            )
            session.add(merge)
        merge.status, merge.progress, merge.error, merge.size_bytes = "queued", 0.0, None, estimate
        merge.attempts, merge.due_at, merge.started_at, merge.finished_at = 0, None, None, None
        merge.sha256, merge.files = None, None
        session.flush()
        record(
            session,
            actor=actor,
            action="adapter.merge",
            target_type="adapter_merge",
            target_id=merge.id,
            tenant_id=tenant_id,
            details={"name": adapter.name, "version": version.version},
        )
        merge_id = merge.id
    MergeOutbox.from_settings(sessions, settings).publish_soon(merge_id)
    return 202, merge_id


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value else None


def file_route(adapter: Adapter, version: AdapterVersion, filename: str) -> str:
    return f"/v1/adapters/{adapter.name}/versions/{version.version}/merge/files/{filename}"


def merge_view(
    adapter: Adapter,
    version: AdapterVersion,
    merge: AdapterMerge,
    storage: Storage,
    settings: Settings,
) -> dict[str, Any]:
    """The job; once succeeded, each file with a download URL: presigned on S3 (valid
    ``merge_download_url_ttl_s``), else this API's streamed file route."""
    files = []
    if merge.status == "succeeded" and merge.sha256 and merge.files:
        for entry in merge.files:
            url = (
                storage.presign_get(
                    merge_key(merge.sha256, entry["name"]), settings.merge_download_url_ttl_s
                )
                if storage.supports_presign
                else file_route(adapter, version, entry["name"])
            )
            files.append({**entry, "url": url})
    return {
        "id": merge.id,
        "object": "adapter.merge",
        "name": adapter.name,
        "version": version.version,
        "adapter_version_id": version.id,
        "base_model": merge.base_model_id,
        "status": merge.status,
        "progress": merge.progress,
        "error": merge.error,
        "sha256": merge.sha256 if merge.status == "succeeded" else None,
        "size_bytes": merge.size_bytes,
        "files": files,
        "url_expires_in_s": settings.merge_download_url_ttl_s if storage.supports_presign else None,
        "created_at": _ts(merge.created_at),
        "started_at": _ts(merge.started_at),
        "finished_at": _ts(merge.finished_at),
    }


def merged_file(merge: AdapterMerge, filename: str) -> dict[str, Any]:
    """The export's entry for ``filename``; 404 unless the merge succeeded and holds it."""
    entries = (merge.files or []) if merge.status == "succeeded" else []
    for entry in entries:
        if entry["name"] == filename:
            return dict(entry)
    raise NotFound(f"the merged model has no file {filename!r}", code="file_not_found")
