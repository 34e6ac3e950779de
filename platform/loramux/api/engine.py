"""Internal engine routes: how a Celery worker (or another process) uses this server's engine.

The remote ``EngineClient`` speaks to these with an admin key; they carry token ids and
sampling parameters only, exactly what the in-process client hands the engine.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loramux.api.common import json_object, principal, state
from loramux.engine_client import EngineClient
from loramux.errors import InvalidRequest
from loramux_engine.errors import InvalidSamplingParamsError, PromptTooLongError
from loramux_engine.lora.ref import AdapterRef
from loramux_engine.outputs import RequestOutput
from loramux_engine.sampling_params import SamplingParams

SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def _engine(request: Request) -> EngineClient:
    principal(request, "admin")
    return state(request).require_engine()


def _adapter(value: Any) -> AdapterRef | None:
    """An AdapterRef from its JSON, ``{"id", "sha256", "namespace"}`` (remote_engine's)."""
    if value is None:
        return None
    try:
        namespace = value.get("namespace", "")
        if not isinstance(namespace, str):
            raise TypeError("namespace must be a string")
        return AdapterRef(str(value["id"]), str(value["sha256"]), namespace)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise InvalidRequest(
            f"adapter must be {{id, sha256, namespace}}: {error}", param="adapter"
        ) from error


async def generate(request: Request) -> Response:
    engine = _engine(request)
    body = await json_object(request)
    params_in = body.get("params") or {}
    if not isinstance(params_in, dict) or set(params_in) - SAMPLING_FIELDS:
        raise InvalidRequest("params must hold SamplingParams fields", param="params")
    try:
        params = SamplingParams(**params_in)
    except (InvalidSamplingParamsError, TypeError) as error:
        raise InvalidRequest(str(error), param="params") from error
    prompt = body.get("prompt_token_ids")
    if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
        raise InvalidRequest("prompt_token_ids must be a list of ints", param="prompt_token_ids")
    try:
        stream = engine.generate(
            str(body.get("request_id")),
            prompt,
            params,
            fairness_key=str(body.get("fairness_key", "")),
            priority=int(body.get("priority", 0)),
            adapter=_adapter(body.get("adapter")),
        )
        first = await anext(stream)
    except (PromptTooLongError, ValueError) as error:
        raise InvalidRequest(str(error), code="invalid_engine_request") from error

    async def lines() -> AsyncIterator[bytes]:
        yield _line(first)
        try:
            async for out in stream:
                yield _line(out)
        except Exception as error:  # in-band, the status line is already sent
            yield (json.dumps({"stream_error": str(error)}) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _line(out: RequestOutput) -> bytes:
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    fields["error"] = None if out.error is None else str(out.error)
    return (json.dumps(fields) + "\n").encode()


async def info(request: Request) -> JSONResponse:
    engine = _engine(request)
    stats = dataclasses.asdict(engine.stats())
    return JSONResponse(
        {
            "base_model_id": state(request).base_model_id,
            "max_model_len": engine.max_model_len,
            "stats": stats,
        }
    )


async def drop_adapter(request: Request) -> JSONResponse:
    engine = _engine(request)
    ref = _adapter(await json_object(request))
    if ref is None:
        raise InvalidRequest("adapter is required", param="adapter")
    engine.drop_adapter(ref)
    return JSONResponse({"dropped": ref.id})


routes = [
    Route("/internal/engine/generate", generate, methods=["POST"]),
    Route("/internal/engine/info", info, methods=["GET"]),
    Route("/internal/engine/drop-adapter", drop_adapter, methods=["POST"]),
]
