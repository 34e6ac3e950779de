"""The API's side of Celery: send a task by name to the broker in the app's settings."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from loramux.jobs.config import QUEUE, VALIDATE_ADAPTER_VERSION, make_celery, producer_timeouts
from loramux.jobs.observability import publish
from loramux.settings import get_settings


class JobQueue:
    """Sends by task name, so the API never imports the worker's task modules.

    Every publish is bounded (``producer_timeouts``): a broker that hangs costs a caller
    seconds and an error, never a wait without end.
    """

    def __init__(self, broker_url: str, timeout_s: float) -> None:
        self.celery: Celery = make_celery(broker_url)
        self.celery.conf.update(producer_timeouts(broker_url, timeout_s))

    def send(self, task_name: str, *args: str) -> None:
        publish(self.celery, task_name, list(args), QUEUE)

    def validate_adapter_version(self, version_id: str) -> None:
        self.send(VALIDATE_ADAPTER_VERSION, version_id)


def job_queue(broker_url: str, timeout_s: float | None = None) -> JobQueue:
    """One producer (and its connection pool) per broker per process; ``timeout_s`` defaults
    to the ``LORAMUX_BROKER_TIMEOUT_S`` setting."""
    if timeout_s is None:
        timeout_s = get_settings().broker_timeout_s
    return _job_queue(broker_url, timeout_s)


@lru_cache(maxsize=8)
def _job_queue(broker_url: str, timeout_s: float) -> JobQueue:
    return JobQueue(broker_url, timeout_s)
