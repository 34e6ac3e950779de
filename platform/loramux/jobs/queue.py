"""The API's side of Celery: send a task by name to the broker in the app's settings."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from loramux.jobs.config import QUEUE, VALIDATE_ADAPTER_VERSION, make_celery


class JobQueue:
    """Sends by task name, so the API never imports the worker's task modules."""

    def __init__(self, broker_url: str) -> None:
        self.celery: Celery = make_celery(broker_url)

    def send(self, task_name: str, *args: str) -> None:
        self.celery.send_task(task_name, args=list(args), queue=QUEUE)

    def validate_adapter_version(self, version_id: str) -> None:
        self.send(VALIDATE_ADAPTER_VERSION, version_id)


@lru_cache(maxsize=8)
def job_queue(broker_url: str) -> JobQueue:
    """One producer (and its connection pool) per broker per process."""
    return JobQueue(broker_url)
