"""OpenTelemetry tracing: the process's tracer provider, made once from settings.

Off by default (``otel_exporter = "none"``): then ``tracer()`` is OpenTelemetry's no-op
tracer and the app adds no tracing middleware. On, a request is one trace: the ASGI server
span, ``loramux.auth``, ``loramux.admission``, one ``loramux.engine.generate`` per choice
(with a ``loramux.engine.queue`` child from submission to the first token, and
``first_token`` / ``finished`` events), and ``loramux.usage``. Celery tasks continue the
trace that enqueued them (W3C ``traceparent`` in the message headers), and a batch
worker's engine calls continue it on the API server (the same header over HTTP, on
``/internal/*``). A ``traceparent`` sent to a public route is ignored, the request starting
its own trace (its request id kept), unless ``trace_trust_incoming`` is set.

Spans carry ids, counts and reasons, never text: no prompt, completion, key secret or
exception message. Every exporter is wrapped so that an exception recorded by a library
(the ASGI instrumentation records what escapes the app) keeps its type and loses its
message.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from loramux.settings import Settings

TRACER_NAME = "loramux"
# Attributes a recorded exception keeps: its type, never its message or traceback.
EXCEPTION_KEEP = ("exception.type", "exception.escaped")

_lock = threading.Lock()
_provider: TracerProvider | None = None
_provider_pid: int | None = None


class TypeOnlyExceptions(SpanExporter):
    """Passes spans on with exception events and error statuses reduced to the type name."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export([_scrubbed(span) for span in spans])

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _scrubbed(span: ReadableSpan) -> ReadableSpan:
    events = [
        Event(
            event.name,
            {k: v for k, v in (event.attributes or {}).items() if k in EXCEPTION_KEEP},
            event.timestamp,
        )
        if event.name == "exception"
        else event
        for event in span.events
    ]
    status = span.status
    if status.description:
        status = Status(status.status_code, status.description.split(":", 1)[0])
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=span.attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def _exporter(settings: Settings) -> SpanExporter | None:
    if settings.otel_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otel_endpoint
        return OTLPSpanExporter(
            endpoint=f"{endpoint.rstrip('/')}/v1/traces" if endpoint else None, timeout=5
        )
    if settings.otel_exporter == "console":
        return ConsoleSpanExporter(service_name=settings.otel_service_name)
    return None


def make_provider(
    service_name: str, exporter: SpanExporter, *, sample_ratio: float = 1.0, batch: bool = True
) -> TracerProvider:
    """A provider exporting to ``exporter`` (in batches, or each span as it ends)."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    wrapped = TypeOnlyExceptions(exporter)
    provider.add_span_processor(
        BatchSpanProcessor(wrapped) if batch else SimpleSpanProcessor(wrapped)
    )
    return provider


def install(provider: TracerProvider | None) -> None:
    """Make ``provider`` this process's (None: tracing off); tests install in-memory ones."""
    global _provider, _provider_pid
    with _lock:
        _provider, _provider_pid = provider, os.getpid()


def setup_tracing(settings: Settings) -> TracerProvider | None:
    """The process's provider, made from settings on the first call (again in a forked
    child, whose inherited export thread is gone); None while tracing is off."""
    global _provider, _provider_pid
    with _lock:
        if _provider_pid == os.getpid():
            return _provider
        exporter = _exporter(settings)
        _provider = (
            None
            if exporter is None
            else make_provider(
                settings.otel_service_name, exporter, sample_ratio=settings.otel_sample_ratio
            )
        )
        _provider_pid = os.getpid()
        return _provider


def provider() -> TracerProvider | None:
    return _provider if _provider_pid == os.getpid() else None


def tracer() -> Tracer:
    current = provider()
    return current.get_tracer(TRACER_NAME) if current is not None else trace.NoOpTracer()


def inject(carrier: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The current context as W3C headers (``traceparent``), for a task or an HTTP call."""
    headers: dict[str, str] = dict(carrier or {})
    propagate.inject(headers)
    return headers


def extract(carrier: Mapping[str, Any]) -> otel_context.Context:
    return propagate.extract(carrier)


def fail(span: Span, error: BaseException, code: str | None = None) -> None:
    """Mark ``span`` failed by the error's type (and API code), never its message."""
    span.set_attribute("error.type", code or type(error).__name__)
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))


def trace_ids() -> tuple[str, str] | None:
    """The current span's trace and span ids in hex, for logs; None outside a trace."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class TracedAuthBackend(AuthenticationBackend):
    """``loramux.auth``: the key check as a span, with the key's row id and tenant."""

    def __init__(self, inner: AuthenticationBackend) -> None:
        self.inner = inner

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        with tracer().start_as_current_span(
            "loramux.auth", record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                result = await self.inner.authenticate(conn)
            except Exception as error:  # KeyRejected carries the API error and its code
                fail(span, error, getattr(getattr(error, "error", None), "code", None))
                raise
            span.set_attribute("loramux.authenticated", result is not None)
            if result is not None:
                for name in ("key_id", "tenant_id"):
                    value = getattr(result[1], name, None)
                    if value:
                        span.set_attribute(f"loramux.{name}", value)
            return result


# The W3C headers by which a caller says which trace a request belongs to.
TRACE_CONTEXT_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})
# Routes whose callers are this deployment's own processes (a batch worker's engine calls).
TRUSTED_PREFIX = "/internal/"


class UntrustedTraceContext:
    """Drops the trace context headers of a request from outside, so that it starts a new
    trace: tenants are hostile, and one that sent a ``traceparent`` would join (or fill
    with its spans) an operator's trace. Kept on ``/internal/*`` routes, and on every
    route when ``trace_trust_incoming`` says the API sits behind a proxy the operator
    trusts to set them."""

    def __init__(self, app: ASGIApp, trust_incoming: bool = False) -> None:
        self.app = app
        self.trust_incoming = trust_incoming

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] in ("http", "websocket")
            and not self.trust_incoming
            and not scope["path"].startswith(TRUSTED_PREFIX)
        ):
            headers = scope.get("headers") or []
            kept = [(n, v) for n, v in headers if n.lower() not in TRACE_CONTEXT_HEADERS]
            if len(kept) != len(headers):
                scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


def asgi_middleware(request_hook: Any = None, *, trust_incoming: bool = False) -> list[Middleware]:
    """The ASGI server span per request, while tracing is on; health checks and scrapes
    are left out. No headers are recorded (Authorization holds the key). An incoming trace
    context is continued only as ``UntrustedTraceContext`` allows."""
    current = provider()
    if current is None:
        return []
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return [
        Middleware(UntrustedTraceContext, trust_incoming=trust_incoming),
        Middleware(
            OpenTelemetryMiddleware,
            excluded_urls="://[^/]+/(healthz|readyz|metrics)$",  # whole paths only
            server_request_hook=request_hook,
            tracer_provider=current,
            exclude_spans=["receive", "send"],
        ),
    ]
