"""The OpenAI Batch API: input files, batch objects, and the runner a Celery worker drives."""

RUN_BATCH = "loramux.run_batch"
RESUME_BATCHES = "loramux.resume_batches"
