"""Celery tasks. Each is idempotent, keyed by its row id, and keeps its state in the registry."""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import OperationalError

from loramux.adapters.base_shape import base_model_shape
from loramux.adapters.cleanup import run_cleanup
from loramux.adapters.merge_job import run_merge
from loramux.adapters.outbox import MERGE_TASK
from loramux.adapters.validation_job import validate_version
from loramux.jobs.app import app
from loramux.jobs.config import CLEANUP_ORPHANED_BLOBS, VALIDATE_ADAPTER_VERSION
from loramux.jobs.context import worker_context
from loramux.storage import StorageError

# Unreachable database or store: retry with backoff; content problems never raise here.
TRANSIENT = (OperationalError, StorageError)


@app.task(
    name=VALIDATE_ADAPTER_VERSION,
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    max_retries=5,
)
def validate_adapter_version(version_id: str) -> str | None:
    context = worker_context()
    return validate_version(
        context.sessions,
        context.storage,
        base_model_shape(context.settings),
        context.settings.max_lora_rank,
        version_id,
    )


@app.task(name=CLEANUP_ORPHANED_BLOBS, autoretry_for=TRANSIENT, retry_backoff=True, max_retries=3)
def cleanup_orphaned_blobs() -> dict[str, Any]:
    context = worker_context()
    return run_cleanup(context.sessions, context.storage, context.settings).as_dict()


@app.task(name=MERGE_TASK, autoretry_for=TRANSIENT, retry_backoff=True, max_retries=5)
def merge_adapter_version(merge_id: str) -> str | None:
    context = worker_context()
    return run_merge(context.sessions, context.storage, context.settings, merge_id)
