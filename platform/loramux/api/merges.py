"""Merge routes: merge an adapter version into the base model, follow the job, download.

Every read goes through the caller's tenant, so another tenant's merge is a 404.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from loramux.adapters.merge import (
    find_merge,
    merge_key,
    merge_view,
    merged_file,
    request_merge,
)
from loramux.api.common import state, tenant_principal

PATH = "/v1/adapters/{name}/versions/{version}/merge"


def _tenant(request: Request, scope: str) -> tuple[str, str]:
    user = tenant_principal(request, scope)
    assert user.tenant_id is not None
    return user.tenant_id, user.actor


def _view(request: Request, tenant_id: str) -> dict[str, Any]:
    app_state = state(request)
    params = request.path_params
    with app_state.sessions() as session:
        adapter, version, merge = find_merge(
            session, tenant_id, params["name"], params["version"], app_state.base_model_id
        )
        return merge_view(adapter, version, merge, app_state.storage, app_state.settings)


async def create_merge(request: Request) -> JSONResponse:
    tenant_id, actor = _tenant(request, "adapters:write")
    app_state = state(request)
    status, _ = await run_in_threadpool(
        request_merge,
        app_state.sessions,
        app_state.settings,
        app_state.base_model_id,
        tenant_id=tenant_id,
        actor=actor,
        name=request.path_params["name"],
        version_text=request.path_params["version"],
    )
    return JSONResponse(await run_in_threadpool(_view, request, tenant_id), status_code=status)


async def get_merge(request: Request) -> JSONResponse:
    tenant_id, _ = _tenant(request, "adapters:read")
    return JSONResponse(await run_in_threadpool(_view, request, tenant_id))


async def download_file(request: Request) -> Response:
    """A file of the export: a redirect to a presigned URL on S3, else streamed here (its
    sha256 checked by the last read)."""
    tenant_id, _ = _tenant(request, "adapters:read")
    app_state = state(request)
    params = request.path_params

    def find() -> tuple[str, dict[str, Any]]:
        with app_state.sessions() as session:
            _, _, merge = find_merge(
                session, tenant_id, params["name"], params["version"], app_state.base_model_id
            )
            entry = merged_file(merge, params["filename"])
            assert merge.sha256 is not None
            return merge_key(merge.sha256, entry["name"]), entry

    key, entry = await run_in_threadpool(find)
    storage = app_state.storage
    if storage.supports_presign:
        url = await run_in_threadpool(
            storage.presign_get, key, app_state.settings.merge_download_url_ttl_s
        )
        return RedirectResponse(url, status_code=307)
    reader = await run_in_threadpool(storage.open, key, expected_sha256=entry["sha256"])

    def chunks() -> Iterator[bytes]:
        with reader:
            yield from reader

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={
            "content-length": str(entry["size_bytes"]),
            "content-disposition": f'attachment; filename="{entry["name"]}"',
        },
    )


routes = [
    Route(PATH, create_merge, methods=["POST"]),
    Route(PATH, get_merge, methods=["GET"]),
    Route(PATH + "/files/{filename}", download_file, methods=["GET"]),
]
