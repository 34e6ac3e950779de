"""Logs: text for a terminal or JSON for a collector, each line with its request and trace ids.

The request id is a context variable set by ``middleware.RequestId`` for the request's
whole run (tasks it starts copy it), so every line logged while serving a request names
it; the trace and span ids come from OpenTelemetry's current span when tracing is on.

What is logged is ids, counts and reasons. A few libraries log payloads at INFO or DEBUG:
SQLAlchemy's engine logs statements with their parameters (a staged batch line holds a
completion) and result rows, botocore logs request bodies (an uploaded batch file holds
prompts), kombu and the HTTP/2 header decoder log messages and headers. Those stay at
WARNING whatever ``log_level`` says.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

from loramux import telemetry
from loramux.settings import Settings

request_id_var: ContextVar[str | None] = ContextVar("loramux_request_id", default=None)

PAYLOAD_LOGGERS = (
    "sqlalchemy.engine",
    "sqlalchemy.orm",
    "botocore",
    "boto3",
    "s3transfer",
    "kombu",
    "hpack",
    "multipart",
    "python_multipart",
)
TEXT_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s [%(request_id)s] %(message)s"
HANDLER_NAME = "loramux"


class RequestContext(logging.Filter):
    """Adds ``request_id``, ``trace_id`` and ``span_id`` to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        ids = telemetry.trace_ids()
        record.trace_id, record.span_id = ids if ids is not None else ("", "")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC), level, logger, message, ids, and the error."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        for name in ("request_id", "trace_id", "span_id"):
            value = getattr(record, name, None)
            if value and value != "-":
                entry[name] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["error"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def handler(log_format: str, stream: IO[str] | None = None) -> logging.Handler:
    out = logging.StreamHandler(stream or sys.stderr)
    out.set_name(HANDLER_NAME)
    out.addFilter(RequestContext())
    if log_format == "json":
        out.setFormatter(JsonFormatter())
    else:
        text = logging.Formatter(TEXT_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
        text.converter = time.gmtime  # UTC, as everywhere else
        out.setFormatter(text)
    return out


def configure_logging(settings: Settings, level: str | int | None = None) -> None:
    """The root logger to stderr in the settings' format and level (``level`` overrides).

    Idempotent: the handler is replaced, not added twice. uvicorn's and Celery's loggers
    propagate to the root, so their lines get the same format and ids.
    """
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == HANDLER_NAME:
            root.removeHandler(existing)
    root.addHandler(handler(settings.log_format))
    resolved = level if level is not None else settings.log_level
    root.setLevel(resolved)
    floor = max(logging.WARNING, root.getEffectiveLevel())
    for name in PAYLOAD_LOGGERS:
        logging.getLogger(name).setLevel(floor)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
