"""The OpenAPI document for every route; ``tests/platform/test_openapi.py`` holds it to the app.

Kept as data beside the routes rather than generated from docstrings, so the contract is
reviewed in one place and a route without an entry (or an entry without a route) fails a test.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from loramux import __version__

TENANT, ADMIN, PUBLIC = "tenant", "admin", "public"

# (method, path, summary, auth, tag, request body media type or None)
OPERATIONS: list[tuple[str, str, str, str, str, str | None]] = [
    ("get", "/healthz", "Liveness", PUBLIC, "health", None),
    ("get", "/readyz", "Readiness: registry and storage reachable", PUBLIC, "health", None),
    ("get", "/metrics", "Prometheus metrics (LORAMUX_METRICS_AUTH)", ADMIN, "health", None),
    ("get", "/openapi.json", "This document", PUBLIC, "health", None),
    (
        "get",
        "/v1/models",
        "The base model and the caller's ready adapters",
        TENANT,
        "inference",
        None,
    ),
    (
        "post",
        "/v1/completions",
        "Text completion (OpenAI)",
        TENANT,
        "inference",
        "application/json",
    ),
    (
        "post",
        "/v1/chat/completions",
        "Chat completion (OpenAI)",
        TENANT,
        "inference",
        "application/json",
    ),
    ("get", "/v1/usage", "The caller's usage per day and adapter", TENANT, "inference", None),
    (
        "post",
        "/v1/adapters",
        "Upload a PEFT LoRA adapter (multipart)",
        TENANT,
        "adapters",
        "multipart/form-data",
    ),
    ("get", "/v1/adapters", "List adapters", TENANT, "adapters", None),
    (
        "post",
        "/v1/adapters/uploads",
        "Start a presigned upload",
        TENANT,
        "adapters",
        "application/json",
    ),
    (
        "post",
        "/v1/adapters/uploads/{id}/complete",
        "Finish a presigned upload",
        TENANT,
        "adapters",
        None,
    ),
    ("get", "/v1/adapters/{name}", "An adapter and its newest version", TENANT, "adapters", None),
    ("delete", "/v1/adapters/{name}", "Delete an adapter", TENANT, "adapters", None),
    ("get", "/v1/adapters/{name}/versions", "An adapter's versions", TENANT, "adapters", None),
    (
        "post",
        "/v1/adapters/{name}/versions/{version}/merge",
        "Merge a ready version into the base model (a job; 202, or 200 with the existing one)",
        TENANT,
        "adapters",
        None,
    ),
    (
        "get",
        "/v1/adapters/{name}/versions/{version}/merge",
        "A merge job: status, progress, error, and its files with download URLs",
        TENANT,
        "adapters",
        None,
    ),
    (
        "get",
        "/v1/adapters/{name}/versions/{version}/merge/files/{filename}",
        "A file of a merged model (streamed, or a redirect to a presigned URL on S3)",
        TENANT,
        "adapters",
        None,
    ),
    (
        "post",
        "/v1/files",
        "Upload a batch input file (multipart)",
        TENANT,
        "batches",
        "multipart/form-data",
    ),
    ("get", "/v1/files", "List files", TENANT, "batches", None),
    ("get", "/v1/files/{id}", "A file", TENANT, "batches", None),
    ("delete", "/v1/files/{id}", "Delete a file", TENANT, "batches", None),
    ("get", "/v1/files/{id}/content", "A file's content", TENANT, "batches", None),
    ("post", "/v1/batches", "Create a batch (OpenAI)", TENANT, "batches", "application/json"),
    ("get", "/v1/batches", "List batches", TENANT, "batches", None),
    ("get", "/v1/batches/{id}", "A batch", TENANT, "batches", None),
    ("post", "/v1/batches/{id}/cancel", "Cancel a batch", TENANT, "batches", None),
    ("get", "/admin/api/tenants", "List tenants", ADMIN, "admin", None),
    (
        "post",
        "/admin/api/tenants",
        "Create a tenant with quotas",
        ADMIN,
        "admin",
        "application/json",
    ),
    ("get", "/admin/api/tenants/{id}", "A tenant (by id or name)", ADMIN, "admin", None),
    (
        "patch",
        "/admin/api/tenants/{id}",
        "Change quotas or status",
        ADMIN,
        "admin",
        "application/json",
    ),
    (
        "post",
        "/admin/api/tenants/{id}/keys",
        "Create an API key (secret shown once)",
        ADMIN,
        "admin",
        "application/json",
    ),
    ("get", "/admin/api/tenants/{id}/keys", "A tenant's keys", ADMIN, "admin", None),
    ("delete", "/admin/api/keys/{id}", "Revoke a key", ADMIN, "admin", None),
    ("get", "/admin/api/audit", "The audit log, newest first", ADMIN, "admin", None),
    ("get", "/admin/api/engine", "Engine and adapter-cache status", ADMIN, "admin", None),
    (
        "get",
        "/admin/api/usage",
        "Usage and cost per day, tenant and adapter (filters: tenant, adapter, dates)",
        ADMIN,
        "admin",
        None,
    ),
    ("get", "/admin/api/prices", "The price table in force", ADMIN, "admin", None),
    (
        "put",
        "/admin/api/prices",
        "Replace the price table (in force from now)",
        ADMIN,
        "admin",
        "application/json",
    ),
    (
        "get",
        "/admin/api/tenants/{id}/statement",
        "A tenant's monthly statement (text/csv, month=YYYY-MM)",
        ADMIN,
        "admin",
        None,
    ),
    (
        "get",
        "/admin/api/tenants/{id}/adapters",
        "A tenant's adapters with every version and its last use",
        ADMIN,
        "admin",
        None,
    ),
    (
        "delete",
        "/admin/api/tenants/{id}/adapters/{name}",
        "Delete a tenant's adapter",
        ADMIN,
        "admin",
        None,
    ),
    (
        "get",
        "/admin/api/batches",
        "Batches of every tenant (filters: tenant, status)",
        ADMIN,
        "admin",
        None,
    ),
    ("post", "/admin/api/batches/{id}/cancel", "Cancel a batch", ADMIN, "admin", None),
    ("get", "/admin", "Admin console (redirect)", PUBLIC, "console", None),
    ("get", "/admin/", "Admin console", PUBLIC, "console", None),
    (
        "post",
        "/internal/engine/generate",
        "Stream engine outputs (workers)",
        ADMIN,
        "internal",
        "application/json",
    ),
    ("get", "/internal/engine/info", "Engine limits and stats (workers)", ADMIN, "internal", None),
    (
        "post",
        "/internal/engine/drop-adapter",
        "Drop an adapter from the engine's caches",
        ADMIN,
        "internal",
        "application/json",
    ),
]

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _path_params(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names
    ]


def build_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, auth, tag, body in OPERATIONS:
        error = {
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        }
        operation: dict[str, Any] = {
            "summary": summary,
            "tags": [tag],
            "operationId": method + "_" + re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_"),
            "responses": {
                "200": {"description": "OK"},
                "400": {**error, "description": "Bad request"},
            },
        }
        if auth != PUBLIC:
            operation["security"] = [{"bearer": []}]
            operation["responses"]["401"] = {**error, "description": "Missing or wrong API key"}
            operation["responses"]["403"] = {**error, "description": "Scope, suspension"}
        if "{" in path:
            operation["parameters"] = _path_params(path)
            operation["responses"]["404"] = {**error, "description": "Not found in your tenant"}
        if body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {body: {"schema": {"type": "object"}}},
            }
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "loramux",
            "version": __version__,
            "description": "Multi-tenant LoRA serving with an OpenAI-compatible API.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "lmx_... API key"}
            },
            "schemas": {"Error": ERROR_SCHEMA},
        },
    }


async def openapi(_request: Request) -> JSONResponse:
    return JSONResponse(build_document())


routes = [Route("/openapi.json", openapi, methods=["GET"])]
