"""``POST /v1/completions``, ``POST /v1/chat/completions`` and ``GET /v1/usage``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loramux.api.common import json_object, state, tenant_principal
from loramux.api.params import date_range
from loramux.billing import day_start, priced_usage, usage_rows
from loramux.errors import APIError
from loramux.inference import render
from loramux.inference.request import GenerationRequest, parse_chat, parse_completion
from loramux.inference.run import Generation, admit, response_body

Parser = Callable[[dict[str, Any], Any, Any], GenerationRequest]


async def _generate(request: Request, parse: Parser) -> Response:
    user = tenant_principal(request, "inference")
    app_state = state(request)
    body = await json_object(request)
    gen_request = parse(body, app_state.settings, app_state.require_engine().tokenizer)
    gen = await admit(
        app_state, gen_request, tenant_id=user.tenant_id or "", api_key_id=user.key_id
    )
    headers = gen.admission.headers
    if gen_request.stream:
        return StreamingResponse(
            _stream(gen),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"},
        )
    try:
        await _until_done_or_disconnected(request, gen)
    finally:
        await gen.close()
    return JSONResponse(response_body(gen), headers=headers)


async def _until_done_or_disconnected(request: Request, gen: Generation) -> None:
    async def consume() -> None:
        async for _ in gen.events():
            pass

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    work = asyncio.create_task(consume())
    watch = asyncio.create_task(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():  # the client left: abort the engine requests
            work.cancel()
        # Until a cancelled task has run its cancellation it is neither done nor cancelled:
        # wait for it, which also waits for the engine requests to be aborted.
        await asyncio.gather(work, watch, return_exceptions=True)
    if work.cancelled():
        gen.status = "cancelled"
        return
    work.result()


async def _stream(gen: Generation) -> AsyncIterator[bytes]:
    chat = gen.request.kind == "chat"
    tokenizer = gen.engine.tokenizer
    want_logprobs = gen.request.params.wants_logprobs
    base = {
        "id": gen.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": gen.created,
        "model": gen.request.model,
        "system_fingerprint": None,
    }
    started: set[int] = set()
    offsets = [0] * gen.request.num_choices
    try:
        async for choice, out in gen.events():
            if chat:
                delta: dict[str, Any] = {"content": out.text}
                if choice.index not in started:
                    started.add(choice.index)
                    delta = {"role": "assistant", **delta}
                payload: dict[str, Any] = {
                    "index": choice.index,
                    "delta": delta,
                    "logprobs": render.chat_logprobs(tokenizer, [out]) if want_logprobs else None,
                    "finish_reason": out.finish_reason,
                }
            else:
                payload = {
                    "index": choice.index,
                    "text": out.text,
                    "logprobs": render.completion_logprobs(tokenizer, [out], offsets[choice.index])
                    if want_logprobs
                    else None,
                    "finish_reason": out.finish_reason,
                }
                offsets[choice.index] += len(out.text)
            chunk = {**base, "choices": [payload]}
            if gen.request.include_usage:
                chunk["usage"] = None
            yield render.sse(chunk)
        if gen.request.include_usage:
            usage = render.usage(gen.prompt_tokens, gen.completion_tokens)
            yield render.sse({**base, "choices": [], "usage": usage})
        yield render.sse("[DONE]")
    except APIError as error:
        yield render.sse(error.body())
    except Exception:  # headers are sent: report in-band, as OpenAI's stream does
        yield render.sse(
            {
                "error": {
                    "message": "The server had an error while processing your request.",
                    "type": "server_error",
                    "param": None,
                    "code": "internal_error",
                }
            }
        )
    finally:
        await gen.close()


async def completions(request: Request) -> Response:
    return await _generate(request, parse_completion)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, parse_chat)


async def usage(request: Request) -> JSONResponse:
    user = tenant_principal(request, "inference")
    start, end = date_range(request)

    def run() -> list[dict[str, Any]]:
        with state(request).sessions() as session:
            lines = priced_usage(
                session,
                day_start(start),
                day_start(end),
                base_model_id=state(request).base_model_id,
                tenant_id=user.tenant_id or "",
            )
            return usage_rows(lines, with_tenant=False)

    return JSONResponse({"object": "list", "data": await run_in_threadpool(run)})


routes = [
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/usage", usage, methods=["GET"]),
]
