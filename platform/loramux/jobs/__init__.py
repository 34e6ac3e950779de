"""Celery: the app the workers run (``celery -A loramux.jobs.app worker``), its tasks, and
the producer the API enqueues with."""
