"""The batch task: idempotent per batch (a lease) and per line (staged rows), so a task
redelivered or re-enqueued after its worker died resumes where the dead one stopped."""

from __future__ import annotations

import logging
from typing import Any

import httpx
from celery import Task
from celery.signals import worker_ready
from sqlalchemy.exc import OperationalError

from loramux.batches import RESUME_BATCHES, RUN_BATCH
from loramux.batches.worker import fail_batch, orphaned_batches, run_batch_now
from loramux.jobs.app import app
from loramux.jobs.context import worker_context
from loramux.remote_engine import RemoteEngineError
from loramux.storage import StorageError

log = logging.getLogger(__name__)
# The registry, the store or the engine server unreachable: the batch resumes later.
TRANSIENT = (OperationalError, StorageError, httpx.TransportError, RemoteEngineError)
MAX_RETRIES = 8


@app.task(name=RUN_BATCH, bind=True, max_retries=MAX_RETRIES)
def run_batch(self: Task, batch_id: str) -> str:
    context = worker_context()
    try:
        return run_batch_now(context, batch_id)
    except TRANSIENT as error:
        log.warning("batch %s paused on %r; retrying", batch_id, error)
        raise self.retry(exc=error, countdown=min(60, 2**self.request.retries)) from error
    except Exception as error:
        log.exception("batch %s failed", batch_id)
        fail_batch(context, batch_id, f"the batch worker failed: {type(error).__name__}")
        raise


@app.task(name=RESUME_BATCHES)
def resume_batches() -> int:
    """Re-enqueue unfinished batches once their lease lapses; a live holder keeps its own.

    Runs when a worker starts; a beat schedule may run it too, to recover a batch whose
    worker died while the other workers stayed up.
    """
    orphans = orphaned_batches(worker_context())
    for batch_id, lease_left_s in orphans:
        run_batch.apply_async((batch_id,), countdown=lease_left_s + 1 if lease_left_s else 0)
    return len(orphans)


@worker_ready.connect
def resume_on_start(**_: Any) -> None:
    resume_batches()
