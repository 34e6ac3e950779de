"""The presigned flow for large weights: create an upload, PUT straight to S3, complete.

The client PUTs the weights to a staging key (``uploads/<id>/...``); completing checks
the staged object's size and sha256 while streaming it to its content-addressed key,
then creates the version exactly as a direct upload does. Content checks run in the
validation task.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import IO, Any, cast

from sqlalchemy import select

from loramux.adapters import idempotency, registry
from loramux.adapters.uploads import (
    AdapterUploads,
    Response,
    StagedAdapter,
    expired,
    storage_unavailable,
)
from loramux.db.models import Adapter, AdapterUpload, AdapterVersion
from loramux.db.models import new_id as make_id
from loramux.errors import InvalidRequest, NotFound
from loramux.storage import BlobCorruptError, BlobNotFound, ChecksumMismatch, adapter_key
from loramux_engine.lora.files import WEIGHTS_NAME

_SHA256 = re.compile(r"[0-9a-f]{64}")
NEEDS_S3 = (
    "presigned uploads need S3-compatible storage (LORAMUX_STORAGE_URL=s3://...); this server "
    "keeps adapters in a local directory: upload with POST /v1/adapters (multipart) instead"
)


def upload_view(upload: AdapterUpload, upload_url: str | None = None) -> dict[str, Any]:
    view = {
        "id": upload.id,
        "object": "adapter.upload",
        "name": upload.name,
        "status": upload.status,
        "sha256": upload.sha256,
        "weights_bytes": upload.weights_bytes,
        "weights_sha256": upload.weights_sha256,
        "expires_at": int(upload.expires_at.timestamp()),
    }
    if upload_url is not None:
        view.update(upload_url=upload_url, method="PUT")
    return view


def create_upload(
    uploads: AdapterUploads, *, tenant_id: str, body: dict[str, Any], idempotency_key: str | None
) -> Response:
    """``POST /v1/adapters/uploads`` ``{name, config, weights_bytes, weights_sha256}``."""
    if not uploads.storage.supports_presign:
        raise InvalidRequest(NEEDS_S3, code="presign_not_supported")
    unknown = sorted(set(body) - {"name", "config", "weights_bytes", "weights_sha256"})
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", param=unknown[0])
    config, size, digest = body.get("config"), body.get("weights_bytes"), body.get("weights_sha256")
    if not isinstance(config, dict):
        raise InvalidRequest("config must be the adapter_config.json object", param="config")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise InvalidRequest("weights_bytes must be the weights file's size", param="weights_bytes")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest.lower()):
        raise InvalidRequest(
            "weights_sha256 must be the weights file's sha256 in hex", param="weights_sha256"
        )
    config_raw = json.dumps(config, indent=2, sort_keys=True).encode()
    name, summary = uploads.check(body.get("name"), config_raw, size)
    staged = StagedAdapter(name, summary, config_raw, digest.lower(), size)
    idem = idempotency.from_header(
        idempotency_key, tenant_id, "POST", "/v1/adapters/uploads",
        {"name": name, "sha256": staged.sha256, "weights_bytes": size},
    )  # fmt: skip
    if (earlier := uploads.precheck(tenant_id, staged, idem)) is not None:
        return earlier
    upload_id = make_id("upl_")
    staging_key = f"uploads/{upload_id}/{WEIGHTS_NAME}"
    with storage_unavailable():
        url = uploads.storage.presign_put(
            staging_key, uploads.settings.adapter_upload_ttl_s, content_length=size
        )
    uploads.lease(tenant_id, staged, kind="presigned", upload_id=upload_id, staging_key=staging_key)
    with uploads.sessions() as session, session.begin():
        upload = session.get(AdapterUpload, upload_id)
        assert upload is not None
        view = upload_view(upload, url)
        if idem is not None:
            idempotency.remember(session, idem, 201, view)
    return 201, view


def complete_upload(
    uploads: AdapterUploads, *, tenant_id: str, actor: str, upload_id: str
) -> Response:
    """``POST /v1/adapters/uploads/{id}/complete``; completing twice returns the same version."""
    with uploads.sessions() as session:
        upload = session.scalar(
            select(AdapterUpload).where(
                AdapterUpload.id == upload_id,
                AdapterUpload.tenant_id == tenant_id,
                AdapterUpload.kind == "presigned",
            )
        )
        if upload is None:
            raise NotFound(f"no upload {upload_id!r}", param="id", code="upload_not_found")
        if upload.status == "completed":
            return 200, _completed_view(session, tenant_id, upload)
    if upload.status != "pending" or expired(upload):
        raise InvalidRequest(
            f"upload {upload_id} expired; create a new one", param="id", code="upload_expired"
        )
    assert upload.staging_key is not None and upload.config_text is not None
    config_raw = upload.config_text.encode()
    name, summary = uploads.check(upload.name, config_raw, upload.weights_bytes)
    staged = StagedAdapter(name, summary, config_raw, upload.weights_sha256, upload.weights_bytes)
    with storage_unavailable():
        _move_weights(uploads, upload.staging_key, staged)
        uploads.put_config(staged)
    response = uploads.commit(upload.id, tenant_id, actor, staged, None, status=200)
    with contextlib.suppress(Exception):
        uploads.storage.delete(upload.staging_key)
    return response


def _move_weights(uploads: AdapterUploads, staging_key: str, staged: StagedAdapter) -> None:
    storage = uploads.storage
    try:
        size = storage.size(staging_key)
    except BlobNotFound:
        raise InvalidRequest(
            "nothing has been uploaded to this upload's upload_url yet",
            param="id",
            code="upload_incomplete",
        ) from None
    if size != staged.weights_bytes:
        raise InvalidRequest(
            f"the uploaded weights are {size} bytes; the upload declared {staged.weights_bytes}",
            param="weights_bytes",
            code="upload_mismatch",
        )
    try:
        with storage.open(staging_key, expected_sha256=staged.weights_sha256) as reader:
            # The reader raises at its end if the staged bytes do not hash to weights_sha256,
            # and put stores nothing then.
            stream = cast(IO[bytes], reader)
            storage.put(
                adapter_key(staged.sha256, WEIGHTS_NAME), stream, sha256=staged.weights_sha256
            )
    except (BlobCorruptError, ChecksumMismatch):
        raise InvalidRequest(
            "the uploaded weights do not match weights_sha256; PUT the file again",
            param="weights_sha256",
            code="upload_mismatch",
        ) from None


def _completed_view(session: Any, tenant_id: str, upload: AdapterUpload) -> dict[str, Any]:
    version = session.get(AdapterVersion, upload.version_id)
    adapter = session.get(Adapter, version.adapter_id) if version else None
    if adapter is None or adapter.tenant_id != tenant_id or adapter.deleted_at is not None:
        raise NotFound("the adapter this upload created was deleted", code="adapter_not_found")
    return registry.adapter_view(session, adapter)
