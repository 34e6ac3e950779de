"""The Celery app the workers run: ``celery -A loramux.jobs.app worker`` (add ``-B`` or run
``celery -A loramux.jobs.app beat`` for the periodic cleanup). Configured from settings."""

from __future__ import annotations

from loramux.jobs import observability  # noqa: F401  (its signal handlers)
from loramux.jobs.config import make_celery
from loramux.settings import get_settings

app = make_celery(
    get_settings().resolved_broker_url,
    include=["loramux.jobs.tasks", "loramux.jobs.batch"],
    cleanup_interval_s=get_settings().cleanup_interval_s,
)
