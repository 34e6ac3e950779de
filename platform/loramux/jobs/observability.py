"""A worker's logs and traces: the settings' log format, and each task as a span that
continues the trace which enqueued it (``traceparent`` in the message headers)."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.signals import setup_logging, task_postrun, task_prerun
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from loramux import telemetry
from loramux.logging_config import configure_logging
from loramux.settings import get_settings

TRACE_HEADERS = ("traceparent", "tracestate")
# Spans of the tasks running in this process, by task id, with their context tokens.
_running: dict[str, tuple[Span, object]] = {}


def publish(celery: Celery, task_name: str, args: list[str], queue: str) -> None:
    """Send a task inside a producer span whose context travels in the message headers."""
    with telemetry.tracer().start_as_current_span(
        f"celery.publish {task_name}",
        kind=SpanKind.PRODUCER,
        attributes={"messaging.system": "celery", "messaging.destination.name": queue},
        record_exception=False,
    ):
        headers = {k: v for k, v in telemetry.inject().items() if k in TRACE_HEADERS}
        celery.send_task(task_name, args=args, queue=queue, headers=headers)


def _headers(request: Any) -> dict[str, str]:
    """Custom message headers: attributes of the task's request (Celery's protocol 2)."""
    found: dict[str, str] = {}
    nested = getattr(request, "headers", None) or {}
    for name in TRACE_HEADERS:
        value = getattr(request, name, None) or nested.get(name)
        if isinstance(value, str):
            found[name] = value
    return found


@task_prerun.connect
def start_task_span(task_id: str, task: Task, **_: Any) -> None:
    telemetry.setup_tracing(get_settings())
    span = telemetry.tracer().start_span(
        f"celery.run {task.name}",
        context=telemetry.extract(_headers(task.request)),
        kind=SpanKind.CONSUMER,
        attributes={"messaging.system": "celery", "celery.task_id": task_id},
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    _running[task_id] = (span, token)


@task_postrun.connect
def end_task_span(task_id: str, state: str | None = None, **_: Any) -> None:
    running = _running.pop(task_id, None)
    if running is None:
        return
    span, token = running
    span.set_attribute("celery.state", state or "")
    if state in ("FAILURE", "RETRY"):
        span.set_status(Status(StatusCode.ERROR, state))
    span.end()
    otel_context.detach(token)  # type: ignore[arg-type]


@setup_logging.connect
def worker_logging(loglevel: str | int | None = None, **_: Any) -> None:
    """Our format instead of Celery's; the worker's --loglevel, else the settings'."""
    configure_logging(get_settings(), loglevel or None)
