"""Uploads: checks at once, blobs stored content-addressed first, then the registry commit.

A crash between the two leaves blobs without a row, never a row without blobs: each
upload first commits an ``AdapterUpload`` lease, which keeps the cleanup task off its
blobs until it expires, and the commit that creates the version ends the lease. The same
commit makes the version's validation message due (adapters/outbox.py): the response never
waits on the broker.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from loramux.adapters import idempotency, registry
from loramux.adapters.base_shape import base_model_shape
from loramux.adapters.config_check import ConfigSummary, check_config_bytes
from loramux.adapters.errors import AdapterRejected
from loramux.adapters.outbox import ValidationOutbox
from loramux.base_models import ModelError
from loramux.db.models import AdapterUpload, Tenant
from loramux.db.session import transaction
from loramux.errors import Conflict, InvalidRequest, ServiceUnavailable
from loramux.settings import Settings
from loramux.storage import (
    BlobCorruptError,
    BlobNotFound,
    ChecksumMismatch,
    Storage,
    StorageError,
    adapter_key,
)
from loramux_engine.lora.errors import UnsupportedAdapterError
from loramux_engine.lora.files import CONFIG_NAME, WEIGHTS_NAME
from loramux_engine.lora.ref import combine_file_digests
from loramux_engine.lora.safetensors_header import read_header_stream

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
Response = tuple[int, dict[str, Any]]


def sha256_stream(stream: IO[bytes]) -> str:
    hasher = hashlib.sha256()
    for chunk in iter(lambda: stream.read(_CHUNK), b""):
        hasher.update(chunk)
    stream.seek(0)
    return hasher.hexdigest()


@contextlib.contextmanager
def storage_unavailable() -> Iterator[None]:
    """The store failing (unreachable, denied) is a 503 the client may retry, not a 500."""
    try:
        yield
    except (BlobNotFound, BlobCorruptError, ChecksumMismatch):
        raise
    except StorageError as error:
        log.warning("adapter storage failed: %s", error)
        raise ServiceUnavailable("adapter storage is unavailable; retry later") from None


def rejected(error: AdapterRejected, param: str) -> InvalidRequest:
    return InvalidRequest(str(error), param=param, code="invalid_adapter")


@dataclass(frozen=True, slots=True)
class StagedAdapter:
    """What a version is made from, once both files are checked and hashed."""

    name: str
    summary: ConfigSummary
    config_raw: bytes
    weights_sha256: str
    weights_bytes: int

    @property
    def sha256(self) -> str:
        return combine_file_digests(
            hashlib.sha256(self.config_raw).digest(), bytes.fromhex(self.weights_sha256)
        )

    @property
    def size_bytes(self) -> int:
        return len(self.config_raw) + self.weights_bytes


@dataclass
class AdapterUploads:
    sessions: sessionmaker[Session]
    storage: Storage
    settings: Settings
    base_model_id: str
    # Publishes one validation message (the outbox's publisher for this process's broker).
    enqueue_validation: Callable[[str], None]

    def check(self, name: Any, config_raw: bytes, weights_bytes: int) -> tuple[str, ConfigSummary]:
        """The checks both upload flows make before anything is stored."""
        name = registry.validate_adapter_name(name, self.base_model_id)
        try:
            shape = base_model_shape(self.settings)
        except ModelError as error:
            log.error("cannot check adapters against the base model: %s", error)
            raise ServiceUnavailable(
                "the base model is not available to check adapters against; retry later"
            ) from None
        try:
            summary = check_config_bytes(config_raw, shape, self.settings.max_lora_rank)
        except AdapterRejected as error:
            raise rejected(error, "config") from None
        if weights_bytes > self.settings.max_adapter_bytes:
            raise InvalidRequest(
                f"{WEIGHTS_NAME} is {weights_bytes} bytes, over the "
                f"{self.settings.max_adapter_bytes}-byte limit for an adapter",
                param="weights",
                code="file_too_large",
            )
        return name, summary

    def upload(
        self,
        *,
        tenant_id: str,
        actor: str,
        name: Any,
        config_raw: bytes,
        weights: IO[bytes],
        weights_bytes: int,
        idempotency_key: str | None,
    ) -> Response:
        """``POST /v1/adapters``: ``weights`` is a seekable local copy of the upload."""
        name, summary = self.check(name, config_raw, weights_bytes)
        try:
            # check() resolved the config against the base model, so its shape is at hand
            # (cached); the validation task checks the exact set of tensors.
            max_tensors = base_model_shape(self.settings).max_adapter_tensors
            read_header_stream(weights, weights_bytes, max_tensors=max_tensors)
        except UnsupportedAdapterError as error:
            raise rejected(AdapterRejected(str(error)), "weights") from None
        weights.seek(0)
        staged = StagedAdapter(name, summary, config_raw, sha256_stream(weights), weights_bytes)
        idem = idempotency.from_header(
            idempotency_key, tenant_id, "POST", "/v1/adapters",
            {"name": staged.name, "sha256": staged.sha256},
        )  # fmt: skip
        if (earlier := self.precheck(tenant_id, staged, idem)) is not None:
            return earlier
        upload_id = self.lease(tenant_id, staged, kind="direct")
        try:
            with storage_unavailable():
                self.put_config(staged)
                self.storage.put(
                    adapter_key(staged.sha256, WEIGHTS_NAME), weights, sha256=staged.weights_sha256
                )
            return self.commit(upload_id, tenant_id, actor, staged, idem, status=201)
        finally:
            # Ends the lease when the commit did not (refused, failed): cleanup may then
            # take the blobs at once if no version uses them.
            with contextlib.suppress(Exception), transaction(self.sessions) as session:
                session.execute(delete(AdapterUpload).where(AdapterUpload.id == upload_id))

    def precheck(
        self, tenant_id: str, staged: StagedAdapter, idem: idempotency.IdempotentRequest | None
    ) -> Response | None:
        """The earlier response of a retried request, else refuse now what the quota forbids."""
        with self.sessions() as session:
            if idem is not None and (earlier := idempotency.replay(session, idem)) is not None:
                return earlier
            tenant = session.get(Tenant, tenant_id)
            assert tenant is not None
            registry.check_quotas(session, tenant, staged.name, staged.size_bytes)
        return None

    def lease(
        self,
        tenant_id: str,
        staged: StagedAdapter,
        *,
        kind: str,
        upload_id: str | None = None,
        staging_key: str | None = None,
    ) -> str:
        upload = AdapterUpload(
            tenant_id=tenant_id,
            name=staged.name,
            kind=kind,
            status="pending",
            sha256=staged.sha256,
            config_text=staged.config_raw.decode() if kind == "presigned" else None,
            weights_bytes=staged.weights_bytes,
            weights_sha256=staged.weights_sha256,
            staging_key=staging_key,
            expires_at=datetime.now(UTC) + timedelta(seconds=self.settings.adapter_upload_ttl_s),
        )
        if upload_id is not None:
            upload.id = upload_id
        with transaction(self.sessions) as session:
            session.add(upload)
            session.flush()
            return upload.id

    def put_config(self, staged: StagedAdapter) -> None:
        self.storage.put(
            adapter_key(staged.sha256, CONFIG_NAME),
            staged.config_raw,
            sha256=hashlib.sha256(staged.config_raw).hexdigest(),
        )

    def commit(
        self,
        upload_id: str,
        tenant_id: str,
        actor: str,
        staged: StagedAdapter,
        idem: idempotency.IdempotentRequest | None,
        *,
        status: int,
    ) -> Response:
        """Create the version (its validation due) and end the lease in one transaction, then
        publish the validation in the background."""
        try:
            with transaction(self.sessions) as session:
                tenant = registry.lock_tenant(session, tenant_id)
                upload = session.get(AdapterUpload, upload_id, with_for_update=True)
                if upload is not None and upload.status == "completed":
                    raise Conflict("this upload was already completed", code="upload_completed")
                if upload is None or upload.status != "pending" or expired(upload):
                    raise InvalidRequest(
                        "the upload took longer than its lease "
                        f"({self.settings.adapter_upload_ttl_s} s); upload again",
                        code="upload_expired",
                    )
                adapter, version = registry.create_version(
                    session,
                    tenant,
                    name=staged.name,
                    base_model_id=self.base_model_id,
                    sha256=staged.sha256,
                    size_bytes=staged.size_bytes,
                    summary=staged.summary,
                    actor=actor,
                )
                if upload.kind == "direct":
                    session.delete(upload)
                else:
                    upload.status, upload.version_id = "completed", version.id
                body = registry.adapter_view(session, adapter)
                if idem is not None:
                    idempotency.remember(session, idem, status, body)
        except IntegrityError:
            if idem is not None:
                with self.sessions() as session:
                    if (earlier := idempotency.replay(session, idem)) is not None:
                        return earlier
            raise Conflict(
                f"another upload of {staged.name!r} committed at the same time; retry",
                param="name",
            ) from None
        ValidationOutbox(self.sessions, self.settings, self.enqueue_validation).publish_soon(
            version.id
        )
        return status, body


def expired(upload: AdapterUpload) -> bool:
    return upload.expires_at <= datetime.now(UTC)
