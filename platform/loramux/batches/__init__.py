"""The OpenAI Batch API: input files, batch objects, and the runner a Celery worker drives."""

from loramux.jobs.config import RESUME_BATCHES, RUN_BATCH

__all__ = ["RESUME_BATCHES", "RUN_BATCH"]
