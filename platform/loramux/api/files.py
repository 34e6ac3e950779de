"""The Files API: ``POST /v1/files`` (batch input), get, content, list and delete.

Reads go through the caller's tenant, so another tenant's file is a 404.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loramux.api.common import state, tenant_principal
from loramux.batches import files
from loramux.batches.pages import list_body, page, parse_limit
from loramux.db.models import File
from loramux.db.session import transaction
from loramux.errors import InvalidRequest

SCOPE = "batches"


def _tenant(request: Request) -> str:
    user = tenant_principal(request, SCOPE)
    assert user.tenant_id is not None
    return user.tenant_id


async def upload_file(request: Request) -> JSONResponse:
    tenant_id = _tenant(request)
    app_state = state(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest(
            "upload a file as multipart/form-data with the fields file and purpose"
        )
    try:
        form = await request.form(max_files=1, max_fields=4)
    except HTTPException as error:  # python-multipart's limits and parse errors
        raise InvalidRequest(f"the multipart body was refused: {error.detail}") from None
    try:
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("the field 'file' must be a file part", param="file")
        if not isinstance(purpose, str):
            raise InvalidRequest("the field 'purpose' is required", param="purpose")
        row = await run_in_threadpool(
            files.create_input_file,
            app_state.sessions,
            app_state.storage,
            app_state.settings,
            tenant_id=tenant_id,
            filename=upload.filename or "",
            purpose=purpose,
            stream=upload.file,
            size=upload.size or 0,
        )
    finally:
        await form.close()
    return JSONResponse(files.file_view(row))


async def get_file(request: Request) -> JSONResponse:
    tenant_id = _tenant(request)

    def run() -> dict[str, Any]:
        with state(request).sessions() as session:
            return files.file_view(files.get_file(session, tenant_id, request.path_params["id"]))

    return JSONResponse(await run_in_threadpool(run))


async def file_content(request: Request) -> Response:
    tenant_id = _tenant(request)
    app_state = state(request)

    def run() -> File:
        with app_state.sessions() as session:
            return files.get_file(session, tenant_id, request.path_params["id"])

    row = await run_in_threadpool(run)
    reader = await run_in_threadpool(
        app_state.storage.open, row.storage_key, expected_sha256=row.sha256
    )

    def chunks() -> Iterator[bytes]:
        with reader:  # the final read verifies the sha256
            yield from reader

    return StreamingResponse(
        chunks(), media_type="application/jsonl", headers={"content-length": str(row.bytes)}
    )


async def list_files(request: Request) -> JSONResponse:
    tenant_id = _tenant(request)
    params = request.query_params
    limit = parse_limit(params.get("limit"), default=100)

    def run() -> dict[str, Any]:
        with state(request).sessions() as session:
            query = files.files_query(tenant_id, params.get("purpose"))
            rows, has_more = page(session, query, File, params.get("after"), limit)
            return list_body([files.file_view(r) for r in rows], has_more)

    return JSONResponse(await run_in_threadpool(run))


async def delete_file(request: Request) -> JSONResponse:
    tenant_id = _tenant(request)
    app_state = state(request)

    def run() -> File:
        with transaction(app_state.sessions) as session:
            return files.delete_file(session, tenant_id, request.path_params["id"])

    row = await run_in_threadpool(run)
    await run_in_threadpool(app_state.storage.delete, row.storage_key)
    return JSONResponse({"id": row.id, "object": "file", "deleted": True})


routes = [
    Route("/v1/files", upload_file, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{id}", get_file, methods=["GET"]),
    Route("/v1/files/{id}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{id}/content", file_content, methods=["GET"]),
]
