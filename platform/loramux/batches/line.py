"""One batch line through the same path as the online API: parse, admit, generate, render.

So a line's response equals the same request made online. Lines run at batch priority and
bypass the per-minute limits (the worker's limiter admits everything, as OpenAI's batches
do) but not the monthly quota, which ``admit`` checks for every line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx

from loramux.batches.jsonl import InputLine
from loramux.batches.staging import LineResult
from loramux.engine_client import BATCH_PRIORITY
from loramux.errors import APIError, InvalidRequest
from loramux.inference.request import parse_chat, parse_completion
from loramux.inference.run import Generation, admit, response_body
from loramux.state import AppState

CHAT_URL = "/v1/chat/completions"
# An unreachable engine server is a reason to retry the batch later, not to fail its lines.
TRANSIENT_ENGINE_ERRORS = (httpx.TransportError,)
# Held by a line from just before its admission to its end, given its number of choices.
LineGate = Callable[[int], AbstractAsyncContextManager[None]]


class EngineFailed(APIError):
    status_code = 500
    type = "server_error"
    code = "engine_error"


def error_result(line: InputLine, error: APIError, usage: dict[str, Any] | None) -> LineResult:
    return LineResult(
        index=line.index,
        custom_id=line.custom_id,
        status_code=error.status_code,
        request_id=None,
        body=error.body(),
        error={"code": error.code or error.type, "message": error.message},
        usage=usage,
    )


def _usage(gen: Generation, status: str) -> dict[str, Any]:
    return {
        "adapter_version_id": gen.resolved.adapter_version_id,
        "request_id": gen.id,
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "latency_ms": int((time.monotonic() - gen.started) * 1000),
        "status": status,
    }


async def _drain(gen: Generation) -> None:
    async for _ in gen.events():
        pass


async def run_line(
    app_state: AppState, line: InputLine, *, tenant_id: str, api_key_id: str | None,
    stop: asyncio.Event, gate: LineGate,
) -> LineResult | None:  # fmt: skip
    """The line's result, or None when ``stop`` was set first (the engine request aborted).

    ``gate(num_choices)`` is held from just before the line is admitted until it ends; it
    raises StandingRevoked (which passes through) when the batch may run no more lines.
    """
    try:
        if line.body.get("stream"):
            raise InvalidRequest("stream is not supported in a batch", param="stream")
        parse = parse_chat if line.url == CHAT_URL else parse_completion
        request = parse(line.body, app_state.settings, app_state.require_engine().tokenizer)
    except APIError as error:
        return error_result(line, error, None)
    except Exception as error:  # parsing is pure work on the line: whatever breaks is its own
        unusable = InvalidRequest(f"This request could not be read: {type(error).__name__}")
        return error_result(line, unusable, None)
    async with gate(request.num_choices):
        if stop.is_set():
            return None
        try:
            gen = await admit(
                app_state, request, tenant_id=tenant_id, api_key_id=api_key_id,
                priority=BATCH_PRIORITY,
            )  # fmt: skip
        except APIError as error:
            return error_result(line, error, None)
        return await _generate(line, gen, stop)


async def _generate(line: InputLine, gen: Generation, stop: asyncio.Event) -> LineResult | None:
    gen.closed = True  # its usage is committed with the staged line, not by Generation.close
    work = asyncio.create_task(_drain(gen))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not work.done():  # closing the engine stream aborts the request there
            work.cancel()
        await asyncio.gather(work, stopped, return_exceptions=True)
    if work.cancelled():
        return None
    failure = work.exception()
    if failure is None:
        body = response_body(gen)
        return LineResult(line.index, line.custom_id, 200, gen.id, body, None, _usage(gen, "ok"))
    if isinstance(failure, APIError):
        return error_result(line, failure, _usage(gen, "error"))
    if isinstance(failure, TRANSIENT_ENGINE_ERRORS):
        raise failure
    failed = EngineFailed(f"The engine failed on this request: {failure}")
    return error_result(line, failed, _usage(gen, "error"))
