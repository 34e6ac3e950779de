"""Tracing: one connected trace for a streamed chat request (spans kept in memory), and one
for a batch line across the API, a real Celery worker (its spans over OTLP/HTTP to a
receiver here) and the engine route the worker calls back; no span carries text."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from loramux import logging_config, telemetry
from loramux.app import build_state, create_app
from loramux.db.migrate import upgrade
from loramux.engine_client import InProcessEngineClient, StorageAdapterSource
from loramux.jobs.embedded import settings_env, worker_command
from loramux.settings import Settings
from loramux.storage import LocalStorage
from loramux_engine.config import EngineConfig
from loramux_engine.engine.async_engine import AsyncLLMEngine
from tests.fixtures.celery import stop_process
from tests.fixtures.services import fresh_pg_database
from tests.platform.adapters.conftest import _save_peft_adapter
from tests.platform.adapters.helpers import upload, wait_validated
from tests.platform.conftest import ADMIN_KEY
from tests.platform.live_server import serve

BROKER_DB = 10  # its own Redis db, consumed only by this file's worker
# Far above what the work takes; reached only when something is broken.
TIMEOUT_S = 120.0
PROMPT = "tracing-prompt-marker-7f3a"


@dataclass(frozen=True)
class SpanRecord:
    """A finished span from either source, reduced to what the checks read."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    attributes: dict[str, Any]
    events: list[str]
    service: str


def from_sdk(span: Any) -> SpanRecord:
    return SpanRecord(
        name=span.name,
        trace_id=format(span.context.trace_id, "032x"),
        span_id=format(span.context.span_id, "016x"),
        parent_id=format(span.parent.span_id, "016x") if span.parent else None,
        attributes=dict(span.attributes or {}),
        events=[event.name for event in span.events],
        service=str(span.resource.attributes.get("service.name")),
    )


def from_otlp(body: bytes) -> list[SpanRecord]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    records = []
    for resource_spans in request.resource_spans:
        service = next(
            (a.value.string_value for a in resource_spans.resource.attributes
             if a.key == "service.name"), "",
        )  # fmt: skip
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attributes: dict[str, Any] = {}
                for attribute in span.attributes:
                    value = attribute.value
                    attributes[attribute.key] = getattr(value, value.WhichOneof("value"))
                records.append(
                    SpanRecord(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex() or None,
                        attributes=attributes,
                        events=[event.name for event in span.events],
                        service=service,
                    )
                )
    return records


def one_connected_trace(spans: list[SpanRecord], root_name: str) -> list[SpanRecord]:
    """The spans of the trace rooted at the one span named ``root_name``, checked to be a
    tree: every span but the root has its parent among them."""
    roots = [s for s in spans if s.name == root_name]
    assert len(roots) == 1, [s.name for s in spans]
    root = roots[0]
    assert root.parent_id is None, "the request starts its own trace"
    trace = [s for s in spans if s.trace_id == root.trace_id]
    ids = {s.span_id for s in trace}
    orphans = [s.name for s in trace if s is not root and s.parent_id not in ids]
    assert orphans == [], f"spans whose parent is not in the trace: {orphans}"
    return trace


def children(trace: list[SpanRecord], parent: SpanRecord) -> list[str]:
    return sorted(s.name for s in trace if s.parent_id == parent.span_id)


def only(trace: list[SpanRecord], name: str) -> SpanRecord:
    found = [s for s in trace if s.name == name]
    assert len(found) == 1, f"{name}: {len(found)} spans in {[s.name for s in trace]}"
    return found[0]


def assert_no_text(trace: list[SpanRecord], *secrets: str) -> None:
    text = json.dumps([s.attributes for s in trace], default=str)
    for secret in secrets:
        assert secret not in text


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """This process's tracer provider, keeping finished spans in memory until the test ends."""
    memory = InMemorySpanExporter()
    telemetry.install(telemetry.make_provider("loramux-test", memory, batch=False))
    try:
        yield memory
    finally:
        telemetry.install(None)


def tiny_engine(tiny_llama_dir: Path, storage_dir: Path) -> InProcessEngineClient:
    config = EngineConfig(
        model_dir=str(tiny_llama_dir),
        device="cpu",
        max_num_seqs=8,
        max_model_len=256,
        kv_cache_bytes=8 << 20,
        max_num_batched_tokens=512,
        adapter_source=StorageAdapterSource(LocalStorage(storage_dir)),
    )
    return InProcessEngineClient(AsyncLLMEngine.from_config(config))


def make_tenant(client: Any) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    tenant = client.post("/admin/api/tenants", json={"name": f"t-{uuid.uuid4().hex[:8]}"},
                         headers=admin)  # fmt: skip
    assert tenant.status_code == 201, tenant.text
    key = client.post(f"/admin/api/tenants/{tenant.json()['id']}/keys", json={"name": "k"},
                      headers=admin)  # fmt: skip
    assert key.status_code == 201, key.text
    return str(key.json()["key"])


def test_a_streamed_chat_request_is_one_trace(
    exporter: InMemorySpanExporter, pg_database: str, pg_engine: Any, tiny_llama_dir: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    settings = Settings(
        home=tmp_path / "home", database_url=pg_database,
        storage_url=(tmp_path / "storage").as_uri(), admin_key=ADMIN_KEY,
        model=str(tiny_llama_dir),
    )  # fmt: skip
    engine = tiny_engine(tiny_llama_dir, tmp_path / "storage")
    app = create_app(settings, app_state=build_state(settings, engine=engine))
    with TestClient(app) as client:
        key = make_tenant(client)
        exporter.clear()
        body = {
            "model": app.state.loramux.base_model_id,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 12,
            "temperature": 0,
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {key}", "X-Request-Id": "trace-test-1"}
        with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            assert r.headers["x-request-id"] == "trace-test-1"
            chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
        completion = "".join(
            json.loads(c[6:])["choices"][0]["delta"].get("content") or "" for c in chunks
        )
    spans = [from_sdk(s) for s in exporter.get_finished_spans()]
    trace = one_connected_trace(spans, "POST /v1/chat/completions")
    root = only(trace, "POST /v1/chat/completions")
    assert root.attributes["loramux.request_id"] == "trace-test-1"
    assert children(trace, root) == [
        "loramux.admission", "loramux.auth", "loramux.engine.generate", "loramux.usage",
    ]  # fmt: skip
    generate = only(trace, "loramux.engine.generate")
    assert children(trace, generate) == ["loramux.engine.queue"]
    assert generate.events == ["first_token", "finished"]
    assert generate.attributes["loramux.finish_reason"] == "length"
    assert generate.attributes["loramux.output_tokens"] == 12
    auth = only(trace, "loramux.auth")
    assert auth.attributes["loramux.authenticated"] is True
    assert auth.attributes["loramux.tenant_id"] == generate.attributes["loramux.tenant_id"]
    usage = only(trace, "loramux.usage")
    assert usage.attributes["loramux.completion_tokens"] == 12
    assert usage.attributes["loramux.status"] == "ok"
    assert completion.strip()
    assert_no_text(trace, PROMPT, key, completion)


def test_a_refused_request_is_traced_by_its_error_code(
    exporter: InMemorySpanExporter, client: TestClient
) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": []},
        headers={"Authorization": "Bearer lmx_not-a-real-key-000000000000"},
    )
    assert response.status_code == 401
    assert response.headers["x-request-id"].startswith("req_")
    spans = [from_sdk(s) for s in exporter.get_finished_spans()]
    trace = one_connected_trace(spans, "POST /v1/chat/completions")
    auth = only(trace, "loramux.auth")
    assert auth.attributes["error.type"] == "invalid_api_key"
    assert_no_text(trace, "lmx_not-a-real-key")
    # Probes and scrapes make no traces; a path that only contains their names does.
    client.get("/healthz")
    client.get("/v1/adapters/metrics", headers={"Authorization": "Bearer lmx_x"})
    names = {s.name for s in exporter.get_finished_spans()}
    assert "GET /healthz" not in names and "GET /v1/adapters/metrics" in names


class OtlpReceiver:
    """An OTLP/HTTP trace endpoint (``POST /v1/traces``, protobuf) keeping what it gets."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    receiver.spans.extend(from_otlp(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


def test_a_batch_line_and_a_validation_continue_their_requests_traces(
    exporter: InMemorySpanExporter, otlp_receiver: OtlpReceiver, redis_url: str,
    tiny_llama_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    """Through a real Celery worker: a batch line continues the trace of the batch's create
    request (and back into the API's engine route), an adapter's validation the upload's."""
    adapter_dir = _save_peft_adapter(
        tiny_llama_dir, tmp_path / "adapter", 0, r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    broker = f"{redis_url.rsplit('/', 1)[0]}/{BROKER_DB}"
    redis.Redis.from_url(broker).flushdb()
    with fresh_pg_database() as database_url:
        upgrade(database_url)
        settings = Settings(
            home=tmp_path / "home", database_url=database_url, broker_url=broker,
            storage_url=(tmp_path / "storage").as_uri(), admin_key=ADMIN_KEY,
            model=str(tiny_llama_dir), batch_poll_s=0.1,
            # Only the upload publishes its validation (no periodic dispatch races it).
            adapter_validation_dispatch_interval_s=3600,
        )  # fmt: skip
        engine = tiny_engine(tiny_llama_dir, tmp_path / "storage")
        app = create_app(settings, app_state=build_state(settings, engine=engine))
        with serve(app) as base_url:
            env = {
                **settings_env(settings.model_copy(update={"engine_url": base_url})),
                "LORAMUX_OTEL_EXPORTER": "otlp",
                "LORAMUX_OTEL_ENDPOINT": otlp_receiver.url,
                "LORAMUX_OTEL_SERVICE_NAME": "loramux-worker",
                "OTEL_BSP_SCHEDULE_DELAY": "100",  # export each span within 0.1 s
            }
            log_path = tmp_path / "worker.log"
            with log_path.open("wb") as log:
                worker = subprocess.Popen(
                    worker_command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                    cwd=tmp_path,
                )  # fmt: skip
            try:
                run_one_batch_line(base_url, worker, log_path, otlp_receiver, adapter_dir)
            finally:
                stop_process(worker)
    server_spans = [from_sdk(s) for s in exporter.get_finished_spans()]
    spans = server_spans + otlp_receiver.spans
    trace = one_connected_trace(spans, "POST /v1/batches")
    root = only(trace, "POST /v1/batches")
    publish = only(trace, "celery.publish loramux.run_batch")
    assert publish.parent_id == root.span_id
    task = only(trace, "celery.run loramux.run_batch")
    assert task.parent_id == publish.span_id and task.service == "loramux-worker"
    line = only(trace, "loramux.batch.line")
    assert line.parent_id == task.span_id and line.attributes["loramux.line"] == 0
    assert children(trace, line) == ["loramux.admission", "loramux.engine.generate"]
    generate = only(trace, "loramux.engine.generate")
    assert generate.events == ["first_token", "finished"]
    # The worker's engine call continues on the API server, which runs the engine.
    engine_call = only(trace, "POST /internal/engine/generate")
    assert engine_call.service == "loramux-test"
    assert engine_call.parent_id == generate.span_id
    assert_no_text(trace, PROMPT)

    validation = one_connected_trace(spans, "POST /v1/adapters")
    upload_span = only(validation, "POST /v1/adapters")
    publish = only(validation, "celery.publish loramux.validate_adapter_version")
    assert publish.parent_id == upload_span.span_id
    task = only(validation, "celery.run loramux.validate_adapter_version")
    assert task.parent_id == publish.span_id and task.service == "loramux-worker"


def run_one_batch_line(
    base_url: str, worker: subprocess.Popen[bytes], log_path: Path, receiver: OtlpReceiver,
    adapter_dir: Path,
) -> None:  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    while " ready." not in log_path.read_text(errors="replace"):
        assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)
    with httpx.Client(base_url=base_url, timeout=30) as client:
        key = make_tenant(client)
        auth = {"Authorization": f"Bearer {key}"}
        model = client.get("/v1/models", headers=auth).json()["data"][0]["id"]
        line = {
            "custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": 4,
                     "messages": [{"role": "user", "content": PROMPT}]},
        }  # fmt: skip
        uploaded = client.post(
            "/v1/files", headers=auth, data={"purpose": "batch"},
            files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
        )  # fmt: skip
        assert uploaded.status_code == 200, uploaded.text
        batch = client.post(
            "/v1/batches", headers=auth,
            json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions",
                  "completion_window": "24h"},
        )  # fmt: skip
        assert batch.status_code == 200, batch.text
        while True:
            status = client.get(f"/v1/batches/{batch.json()['id']}", headers=auth).json()
            if status["status"] == "completed":
                assert status["request_counts"]["completed"] == 1, status
                break
            assert status["status"] in ("validating", "in_progress", "finalizing"), status
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        uploaded = upload(client, key, "traced", adapter_dir)  # type: ignore[arg-type]
        assert uploaded.status_code in (200, 201, 202), uploaded.text
        assert wait_validated(client, key, "traced")["status"] == "ready"
    # A task's own span ends after its result is written: wait for both to arrive.
    tasks = {"celery.run loramux.run_batch", "celery.run loramux.validate_adapter_version"}
    while not tasks <= {s.name for s in receiver.spans}:
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.1)


def test_request_ids_are_kept_when_safe_and_replaced_otherwise(client: TestClient) -> None:
    def answered_id(sent: str | None) -> str:
        headers = {} if sent is None else {"X-Request-Id": sent}
        response = client.get("/healthz", headers=headers)
        assert response.status_code == 200
        return str(response.headers["x-request-id"])

    assert answered_id("abc-123_DEF.4:5") == "abc-123_DEF.4:5"
    generated = {answered_id(None), answered_id(None)}
    assert len(generated) == 2 and all(re.fullmatch(r"req_[0-9a-f]{24}", g) for g in generated)
    for hostile in ("x" * 129, "two words", 'quote"d', "new\\nline", "semi;colon", "per%cent"):
        assert answered_id(hostile).startswith("req_")


def test_exported_exceptions_keep_their_type_not_their_message() -> None:
    memory = InMemorySpanExporter()
    provider = telemetry.make_provider("scrub", memory, batch=False)
    with (
        pytest.raises(ValueError),
        provider.get_tracer("t").start_as_current_span("work"),  # records what escapes
    ):
        raise ValueError(f"a message holding {PROMPT}")
    [span] = memory.get_finished_spans()
    [event] = span.events
    assert event.name == "exception"
    assert set(event.attributes or {}) <= {"exception.type", "exception.escaped"}
    assert (event.attributes or {})["exception.type"] == "ValueError"
    assert span.status.description == "ValueError"
    assert PROMPT not in json.dumps(span.to_json())


def test_log_lines_carry_the_request_and_trace_ids(exporter: InMemorySpanExporter) -> None:
    stream = io.StringIO()
    logger = logging.getLogger("loramux.test_log_ids")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    trace_ids = []
    for log_format in ("json", "text"):
        logger.handlers = [logging_config.handler(log_format, stream)]
        token = logging_config.request_id_var.set("req-in-log")
        try:
            with telemetry.tracer().start_as_current_span("logged") as span:
                logger.info("served %s", "it")
                trace_ids.append(format(span.get_span_context().trace_id, "032x"))
        finally:
            logging_config.request_id_var.reset(token)
        logger.info("outside")
    json_line, json_outside, text_line, text_outside = stream.getvalue().splitlines()
    record = json.loads(json_line)
    assert record["message"] == "served it" and record["request_id"] == "req-in-log"
    assert record["trace_id"] == trace_ids[0] and record["time"].endswith("+00:00")
    assert "request_id" not in json.loads(json_outside)
    assert re.fullmatch(r"\S+Z INFO loramux.test_log_ids \[req-in-log\] served it", text_line)
    assert text_outside.endswith("[-] outside")


def test_payload_loggers_stay_at_warning_under_debug() -> None:
    touched = ["", *logging_config.PAYLOAD_LOGGERS, "uvicorn", "uvicorn.error", "uvicorn.access"]
    saved = {
        name: (log.level, list(log.handlers), log.propagate)
        for name in touched
        if (log := logging.getLogger(name))
    }
    try:
        logging_config.configure_logging(Settings(log_level="DEBUG"))
        assert logging.getLogger().level == logging.DEBUG
        assert logging.getLogger("loramux").isEnabledFor(logging.DEBUG)
        for name in ("sqlalchemy.engine", "botocore", "kombu"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO)
    finally:
        for name, (level, handlers, propagate) in saved.items():
            log = logging.getLogger(name)
            log.setLevel(level)
            log.handlers = handlers
            log.propagate = propagate


HOSTILE_TRACE = "0af7651916cd43dd8448eb211c80319c"
HOSTILE_PARENT = "b7ad6b7169203331"


def traced_app(settings: Settings, **update: Any) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=update),
                                 app_state=build_state(settings)))  # fmt: skip


@pytest.mark.parametrize("trust_incoming", [False, True])
def test_a_callers_traceparent_is_continued_only_where_trusted(
    exporter: InMemorySpanExporter, settings: Settings, trust_incoming: bool
) -> None:
    """Public routes start their own trace unless ``trace_trust_incoming``; /internal/*
    (a worker's engine calls) continue the caller's. The request id stays either way."""
    headers = {
        "traceparent": f"00-{HOSTILE_TRACE}-{HOSTILE_PARENT}-01",
        "tracestate": "evil=1",
        "X-Request-Id": "sent-by-caller",
    }
    with traced_app(settings, trace_trust_incoming=trust_incoming) as client:
        public = client.get("/v1/models", headers=headers)
        internal = client.get("/internal/engine/info", headers=headers)
    assert public.headers["x-request-id"] == internal.headers["x-request-id"] == "sent-by-caller"
    assert internal.status_code == 401  # no admin key; the span still continues the hop
    spans = {s.name: s for s in map(from_sdk, exporter.get_finished_spans())}
    public_span, internal_span = spans["GET /v1/models"], spans["GET /internal/engine/info"]
    assert internal_span.trace_id == HOSTILE_TRACE
    assert internal_span.parent_id == HOSTILE_PARENT
    assert public_span.attributes["loramux.request_id"] == "sent-by-caller"
    if trust_incoming:
        assert (public_span.trace_id, public_span.parent_id) == (HOSTILE_TRACE, HOSTILE_PARENT)
    else:
        assert public_span.trace_id != HOSTILE_TRACE and public_span.parent_id is None
