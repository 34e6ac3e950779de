"""The validation task's work for one version, idempotent by version id.

A version already ``ready`` or ``rejected`` is left alone, so a redelivered message, or one
the outbox published again after a timeout (adapters/outbox.py), is a no-op; the final
status is written only while the row is still ``validating``, so of two copies running at
once, or a copy finishing after the outbox rejected the version, one outcome stands. The
stored files are checked against the version's sha256 before their content is.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loramux.adapters.errors import AdapterRejected
from loramux.adapters.validation import ValidatedAdapter, validate_adapter_files
from loramux.db.models import Adapter, AdapterVersion
from loramux.db.session import transaction
from loramux.storage import BlobCorruptError, BlobNotFound, Storage
from loramux_engine.lora.files import CONFIG_NAME, WEIGHTS_NAME
from loramux_engine.lora.ref import combine_file_digests
from loramux_engine.lora.shape import BaseModelShape

log = logging.getLogger(__name__)
FINAL = ("ready", "rejected")


def validate_version(
    sessions: sessionmaker[Session],
    storage: Storage,
    shape: BaseModelShape,
    max_rank: int,
    version_id: str,
) -> str | None:
    """Validate one version; returns its final status, or None if it is gone or deleted."""
    with sessions() as session:
        row = session.execute(
            select(AdapterVersion, Adapter.deleted_at)
            .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
            .where(AdapterVersion.id == version_id)
        ).first()
    if row is None or row[1] is not None:
        return None
    version: AdapterVersion = row[0]
    if version.status in FINAL:
        return version.status
    try:
        outcome: ValidatedAdapter | str = _check(storage, shape, max_rank, version)
    except AdapterRejected as error:
        outcome = str(error)
    return _finish(sessions, version_id, outcome)


def _check(
    storage: Storage, shape: BaseModelShape, max_rank: int, version: AdapterVersion
) -> ValidatedAdapter:
    with tempfile.TemporaryDirectory(prefix="loramux-validate-") as tmp:
        config_path, weights_path = Path(tmp) / CONFIG_NAME, Path(tmp) / WEIGHTS_NAME
        try:
            config = storage.download_to(version.config_key, config_path, expected_sha256=None)
            weights = storage.download_to(version.weights_key, weights_path, expected_sha256=None)
        except (BlobNotFound, BlobCorruptError) as error:
            raise AdapterRejected(
                f"the stored adapter files are missing or damaged ({error}); upload it again"
            ) from None
        digest = combine_file_digests(bytes.fromhex(config.sha256), bytes.fromhex(weights.sha256))
        if digest != version.sha256:
            raise AdapterRejected("the stored adapter files do not match its sha256; upload again")
        try:
            return validate_adapter_files(config_path, weights_path, shape, max_rank)
        except AdapterRejected:
            raise
        except Exception as error:
            # A checker failing on crafted content is a refusal of that content, never a
            # version left validating forever.
            log.exception("validation of %s failed unexpectedly", version.id)
            raise AdapterRejected(
                f"the adapter could not be validated ({type(error).__name__}); it was not accepted"
            ) from None


def _finish(
    sessions: sessionmaker[Session], version_id: str, outcome: ValidatedAdapter | str
) -> str | None:
    if isinstance(outcome, str):
        values: dict[str, object] = {"status": "rejected", "reason": outcome}
    else:
        values = {
            "status": "ready",
            "reason": None,
            "rank": outcome.rank,
            "alpha": outcome.alpha,
            "target_modules": outcome.target_modules,
            "ready_at": datetime.now(UTC),
        }
    with transaction(sessions) as session:
        session.execute(
            update(AdapterVersion)
            .where(AdapterVersion.id == version_id, AdapterVersion.status == "validating")
            .values(**values)
        )
        status = session.scalar(
            select(AdapterVersion.status).where(AdapterVersion.id == version_id)
        )
    log.info("adapter version %s: %s", version_id, status)
    return status
