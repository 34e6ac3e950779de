"""The one Celery configuration, shared by the worker app and the API's producer."""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery

QUEUE = "loramux"
VALIDATE_ADAPTER_VERSION = "loramux.validate_adapter_version"
CLEANUP_ORPHANED_BLOBS = "loramux.cleanup_orphaned_blobs"
RUN_BATCH = "loramux.run_batch"
RESUME_BATCHES = "loramux.resume_batches"


def make_celery(
    broker_url: str, *, include: Sequence[str] = (), cleanup_interval_s: float | None = None
) -> Celery:
    """State lives in the registry, so there is no result backend; JSON only, never pickle.

    Acks late with reject-on-lost and prefetch 1: a worker that dies mid-task leaves its
    message to be redelivered, and every task is idempotent by its row id.
    """
    app = Celery("loramux", broker=broker_url, include=list(include), set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        # A publish to a broker that is down gives up quickly; what was not sent is still
        # in the registry and is sent again (the validation outbox, resume_batches).
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
    )
    if cleanup_interval_s:
        app.conf.beat_schedule = {
            "cleanup-orphaned-blobs": {
                "task": CLEANUP_ORPHANED_BLOBS,
                "schedule": cleanup_interval_s,
            },
            # Batches whose worker died while other workers stayed up: their lease lapses
            # and this hands them to a live worker.
            "resume-batches": {"task": RESUME_BATCHES, "schedule": 60.0},
        }
    return app


def producer_timeouts(broker_url: str, timeout_s: float) -> dict[str, object]:
    """Configuration bounding a publish to a broker that accepts and then never answers.

    Celery's own connect timeout covers connecting; a frozen broker also needs the
    transport's socket timeouts, without which a publish waits forever. Producers only: a
    worker's long-polling reads (BRPOP) must not time out.
    """
    conf: dict[str, object] = {"broker_connection_timeout": timeout_s}
    scheme = broker_url.partition("://")[0]
    if scheme in ("redis", "rediss", "sentinel"):
        conf["broker_transport_options"] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
        }
    elif scheme in ("amqp", "amqps", "pyamqp"):
        conf["broker_transport_options"] = {"read_timeout": timeout_s, "write_timeout": timeout_s}
    return conf
