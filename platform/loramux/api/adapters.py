"""Adapter routes: multipart and presigned uploads, list, get, versions, delete.

Every read goes through the caller's tenant, so another tenant's adapter is a 404.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from loramux.adapters import presigned, registry
from loramux.adapters.config_check import MAX_CONFIG_BYTES
from loramux.adapters.idempotency import HEADER as IDEMPOTENCY_HEADER
from loramux.adapters.uploads import AdapterUploads
from loramux.api.common import json_object, state, tenant_principal
from loramux.db.models import Adapter, AdapterVersion
from loramux.db.scoped import scoped
from loramux.db.session import transaction
from loramux.errors import InvalidRequest
from loramux.jobs.queue import job_queue
from loramux.state import AppState
from loramux_engine.lora.files import CONFIG_NAME, WEIGHTS_NAME
from loramux_engine.lora.ref import AdapterRef

log = logging.getLogger(__name__)

FIELDS = ("name", "config", "weights")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _uploads(request: Request) -> AdapterUploads:
    app_state = state(request)
    return AdapterUploads(
        sessions=app_state.sessions,
        storage=app_state.storage,
        settings=app_state.settings,
        base_model_id=app_state.base_model_id,
        enqueue_validation=job_queue(
            app_state.settings.resolved_broker_url
        ).validate_adapter_version,
    )


def _tenant(request: Request, scope: str) -> tuple[str, str]:
    """The caller's tenant id and audit actor; a tenant key holding ``scope`` is required."""
    user = tenant_principal(request, scope)
    assert user.tenant_id is not None
    return user.tenant_id, user.actor


def _page(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": items}


async def _form(request: Request) -> FormData:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest(
            "upload an adapter as multipart/form-data with the fields name, config "
            f"({CONFIG_NAME}) and weights ({WEIGHTS_NAME})"
        )
    try:
        return await request.form(max_files=8, max_fields=8, max_part_size=MAX_CONFIG_BYTES)
    except HTTPException as error:  # python-multipart's limits and parse errors
        raise InvalidRequest(f"the multipart body was refused: {error.detail}") from None


def _one(form: FormData, field: str) -> UploadFile | str:
    values = form.getlist(field)
    if not values:
        raise InvalidRequest(f"the field {field!r} is missing", param=field)
    if len(values) > 1:
        raise InvalidRequest(f"the field {field!r} was sent {len(values)} times", param=field)
    return values[0]


def _check_filename(upload: UploadFile, field: str, expected: str) -> None:
    filename = (upload.filename or "").lower()
    if filename.endswith(PICKLE_SUFFIXES):
        raise InvalidRequest(
            f"{upload.filename!r} is a pickle-based PyTorch file, which is refused; send "
            f"{WEIGHTS_NAME} (PEFT's save_pretrained with safe_serialization=True)",
            param=field,
            code="unsupported_file",
        )
    if filename and not filename.endswith(expected):
        raise InvalidRequest(
            f"the field {field!r} must be a {expected} file, got {upload.filename!r}",
            param=field,
            code="unsupported_file",
        )


async def upload_adapter(request: Request) -> JSONResponse:
    tenant_id, actor = _tenant(request, "adapters:write")
    form = await _form(request)
    try:
        unexpected = sorted(set(form.keys()) - set(FIELDS))
        if unexpected:
            raise InvalidRequest(
                f"unexpected field {unexpected[0]!r}: an upload holds only name, config "
                f"({CONFIG_NAME}) and weights ({WEIGHTS_NAME})",
                param=unexpected[0],
                code="unsupported_file",
            )
        name, config, weights = (_one(form, field) for field in FIELDS)
        if not isinstance(name, str):
            raise InvalidRequest("name must be a text field", param="name")
        if not isinstance(weights, UploadFile):
            raise InvalidRequest(f"weights must be a file part ({WEIGHTS_NAME})", param="weights")
        _check_filename(weights, "weights", ".safetensors")
        if isinstance(config, UploadFile):
            _check_filename(config, "config", ".json")
            if (config.size or 0) > MAX_CONFIG_BYTES:
                raise InvalidRequest(
                    f"{CONFIG_NAME} is over {MAX_CONFIG_BYTES} bytes", param="config"
                )
            config_raw = await config.read()
        else:
            config_raw = config.encode()
        uploads = _uploads(request)
        status, body = await run_in_threadpool(
            uploads.upload,
            tenant_id=tenant_id,
            actor=actor,
            name=name,
            config_raw=config_raw,
            weights=weights.file,
            weights_bytes=weights.size or 0,
            idempotency_key=request.headers.get(IDEMPOTENCY_HEADER),
        )
    finally:
        await form.close()
    return JSONResponse(body, status_code=status)


async def create_upload(request: Request) -> JSONResponse:
    tenant_id, actor = _tenant(request, "adapters:write")
    body = await json_object(request)
    uploads = _uploads(request)
    status, view = await run_in_threadpool(
        presigned.create_upload,
        uploads,
        tenant_id=tenant_id,
        body=body,
        idempotency_key=request.headers.get(IDEMPOTENCY_HEADER),
    )
    return JSONResponse(view, status_code=status)


async def complete_upload(request: Request) -> JSONResponse:
    tenant_id, actor = _tenant(request, "adapters:write")
    uploads = _uploads(request)
    status, view = await run_in_threadpool(
        presigned.complete_upload,
        uploads,
        tenant_id=tenant_id,
        actor=actor,
        upload_id=request.path_params["id"],
    )
    return JSONResponse(view, status_code=status)


async def list_adapters(request: Request) -> JSONResponse:
    tenant_id, actor = _tenant(request, "adapters:read")

    def run() -> list[dict[str, Any]]:
        with state(request).sessions() as session:
            return registry.list_adapters(session, tenant_id)

    return JSONResponse(_page(await run_in_threadpool(run)))


async def get_adapter(request: Request) -> JSONResponse:
    tenant_id, actor = _tenant(request, "adapters:read")

    def run() -> dict[str, Any]:
        with state(request).sessions() as session:
            adapter = registry.find_adapter(session, tenant_id, request.path_params["name"])
            return registry.adapter_view(session, adapter)

    return JSONResponse(await run_in_threadpool(run))


async def list_versions(request: Request) -> JSONResponse:
    tenant_id, actor = _tenant(request, "adapters:read")

    def run() -> list[dict[str, Any]]:
        with state(request).sessions() as session:
            return registry.list_versions(session, tenant_id, request.path_params["name"])

    return JSONResponse(_page(await run_in_threadpool(run)))


def _refs_to_drop(
    session: Session, tenant_id: str, versions: list[AdapterVersion]
) -> list[AdapterRef]:
    """The engine entries a delete frees: one per content no other live version still uses.

    The engine keys its cache by (tenant, sha256), so another adapter of the same tenant
    with identical bytes shares the entry and keeps it; other tenants never share it.
    """
    shas = {version.sha256 for version in versions}
    still_used = set(
        session.scalars(
            scoped(AdapterVersion, tenant_id)
            .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
            .where(Adapter.deleted_at.is_(None), AdapterVersion.sha256.in_(shas))
            .with_only_columns(AdapterVersion.sha256)
        )
    )
    refs: dict[str, AdapterRef] = {}
    for version in versions:
        if version.sha256 not in still_used:
            refs.setdefault(
                version.sha256, AdapterRef(version.id, version.sha256, namespace=tenant_id)
            )
    return list(refs.values())


async def remove_adapter(
    app_state: AppState, tenant_id: str, name: str, actor: str
) -> JSONResponse:
    """Soft-delete the tenant's adapter ``name`` and drop what it held from the engine (the
    tenant's own route and the admin console's)."""

    def run() -> tuple[dict[str, Any], list[AdapterRef]]:
        with transaction(app_state.sessions) as session:
            adapter, versions = registry.delete_adapter(session, tenant_id, name, actor=actor)
            view = {"id": adapter.id, "object": "adapter", "name": adapter.name, "deleted": True}
            return view, _refs_to_drop(session, tenant_id, versions)

    view, refs = await run_in_threadpool(run)
    if app_state.engine is not None:
        for ref in refs:
            try:
                app_state.engine.drop_adapter(ref)
            except Exception:  # the adapter is deleted either way; the engine's LRU ages it out
                log.exception("engine could not drop adapter version %s", ref.id)
    return JSONResponse(view)


async def delete_adapter(request: Request) -> JSONResponse:
    tenant_id, actor = _tenant(request, "adapters:write")
    return await remove_adapter(state(request), tenant_id, request.path_params["name"], actor)


routes = [
    Route("/v1/adapters", upload_adapter, methods=["POST"]),
    Route("/v1/adapters", list_adapters, methods=["GET"]),
    Route("/v1/adapters/uploads", create_upload, methods=["POST"]),
    Route("/v1/adapters/uploads/{id}/complete", complete_upload, methods=["POST"]),
    Route("/v1/adapters/{name}", get_adapter, methods=["GET"]),
    Route("/v1/adapters/{name}", delete_adapter, methods=["DELETE"]),
    Route("/v1/adapters/{name}/versions", list_versions, methods=["GET"]),
]
