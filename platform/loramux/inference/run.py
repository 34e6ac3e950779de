"""One OpenAI-style generation: admission, the engine run, usage, and the response.

Shared by the HTTP routes and the batch worker so both bill and limit the same way.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
from opentelemetry import context as otel_context
from opentelemetry.trace import Span
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from loramux import telemetry
from loramux.adapters.merged_serving import resolve_served_model
from loramux.db.models import Tenant
from loramux.drain import ShuttingDown
from loramux.engine_client import INTERACTIVE_PRIORITY, EngineClient
from loramux.errors import APIError, InvalidRequest, ServiceUnavailable, dependency_unavailable
from loramux.inference import render
from loramux.inference.request import SEED_LIMIT, GenerationRequest
from loramux.limits import Admission, Limits
from loramux.resolve import ResolvedModel
from loramux.state import AppState
from loramux.usage import record_usage, tokens_this_month
from loramux.usage_spool import spool_for
from loramux_engine.errors import NonFiniteLogitsError, PromptTooLongError, SequenceFailedError
from loramux_engine.lora.errors import AdapterLoadError
from loramux_engine.outputs import RequestOutput

logger = logging.getLogger(__name__)


@dataclass
class Choice:
    index: int
    outputs: list[RequestOutput] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(o.new_token_ids) for o in self.outputs)


@dataclass
class Generation:
    """A request admitted to the engine; iterate ``events()`` once, then ``close()``."""

    app_state: AppState
    engine: EngineClient
    request: GenerationRequest
    resolved: ResolvedModel
    tenant_id: str
    api_key_id: str | None
    admission: Admission
    priority: int = INTERACTIVE_PRIORITY
    billing_key: str | None = None
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    choices: list[Choice] = field(default_factory=list)
    status: str = "cancelled"
    started: float = field(default_factory=time.monotonic)
    closed: bool = False
    # The trace this generation belongs to (the request's, or a batch line's): its engine
    # and usage spans are children of that span, whichever task runs them.
    trace_context: otel_context.Context = field(default_factory=otel_context.get_current)

    def __post_init__(self) -> None:
        prefix = "chatcmpl-" if self.request.kind == "chat" else "cmpl-"
        self.id = self.id or prefix + secrets.token_hex(12)
        self.choices = [Choice(i) for i in range(self.request.num_choices)]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.request.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    async def events(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Outputs of every choice as they come, interleaved."""
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()
        params = self.request.params

        async def pump(index: int, prompt: list[int]) -> None:
            # Everything in the try: a pump that dies without a word leaves the consumer
            # waiting for it for ever.
            try:
                choice_params = params
                if params.seed is not None and index:
                    choice_params = _replace_seed(params, params.seed + index)
                with self._engine_span(index, len(prompt), choice_params) as span:
                    submitted = time.monotonic()
                    # From submission to the first output: the wait for a running slot
                    # (and for a cold adapter) plus the prompt's prefill.
                    queued: Span | None = telemetry.tracer().start_span("loramux.engine.queue")
                    try:
                        async for out in self.engine.generate(
                            f"{self.id}-{index}",
                            prompt,
                            choice_params,
                            fairness_key=self.tenant_id,
                            priority=self.priority,
                            adapter=self.resolved.adapter,
                        ):
                            if queued is not None:
                                queued.end()
                                queued = None
                                span.add_event(
                                    "first_token",
                                    {"loramux.time_to_first_token_s": time.monotonic() - submitted},
                                )
                            if out.finished:
                                _trace_finish(span, out)
                            await queue.put((index, out))
                    except BaseException as error:  # a cancel (the client left) included
                        telemetry.fail(span, error)
                        raise
                    finally:
                        if queued is not None:
                            queued.end()
                await queue.put((index, None))
            except BaseException as error:  # delivered to the consumer, which re-raises
                await queue.put((index, error))

        n = self.request.n
        tasks = [
            asyncio.create_task(pump(i, self.request.prompts[i // n]))
            for i in range(self.request.num_choices)
        ]
        # Shutdown's grace ran out: end here, billed for what was generated (drain.py).
        undrain = self.app_state.drain.on_expiry(lambda: queue.put_nowait((-1, ShuttingDown())))
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, NonFiniteLogitsError):  # its own adapter or numbers
                    raise InvalidRequest(
                        f"This request could not be completed: {item}", code="non_finite_logits"
                    ) from item
                if isinstance(item, AdapterLoadError | SequenceFailedError) or (
                    isinstance(item, RequestOutput) and item.finish_reason == "error"
                ):
                    # e.g. the adapter's blobs could not be fetched or failed their sha256
                    cause = item if isinstance(item, BaseException) else item.error
                    raise ServiceUnavailable(
                        f"The engine could not serve this request: {cause}", code="engine_error"
                    )
                if isinstance(item, BaseException):
                    raise item
                choice = self.choices[index]
                if item.new_token_ids and not any(c.outputs for c in self.choices):
                    self.app_state.metrics.time_to_first_token.observe(
                        time.monotonic() - self.started
                    )
                choice.outputs.append(item)
                choice.text += item.text
                if item.finish_reason is not None:
                    choice.finish_reason = item.finish_reason
                yield choice, item
            self.status = "ok"
        except Exception:
            self.status = "error"
            raise
        finally:
            undrain()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _engine_span(self, index: int, num_prompt_tokens: int, params: Any) -> Any:
        """``loramux.engine.generate`` for choice ``index``, current in its pump's task."""
        attributes: dict[str, Any] = {
            "loramux.generation_id": self.id,
            "loramux.choice": index,
            "loramux.prompt_tokens": num_prompt_tokens,
            "loramux.max_tokens": params.max_tokens or 0,
            "loramux.priority": self.priority,
            "loramux.tenant_id": self.tenant_id,
        }
        if self.resolved.adapter_version_id is not None:
            attributes["loramux.adapter_version_id"] = self.resolved.adapter_version_id
        return telemetry.tracer().start_as_current_span(
            "loramux.engine.generate",
            context=self.trace_context,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        )

    async def close(self) -> None:
        """Give back unused tokens and write the usage record, even when cancelled."""
        if self.closed:
            return
        self.closed = True
        self.app_state.metrics.e2e_request_latency.observe(time.monotonic() - self.started)
        self.app_state.metrics.requests.labels(status=self.status).inc()
        logger.info(
            "%s finished: %s, %d prompt and %d completion tokens",
            self.id, self.status, self.prompt_tokens, self.completion_tokens,
        )  # fmt: skip
        with (
            anyio.CancelScope(shield=True),
            telemetry.tracer().start_as_current_span(
                "loramux.usage",
                context=self.trace_context,
                attributes={
                    "loramux.generation_id": self.id,
                    "loramux.status": self.status,
                    "loramux.prompt_tokens": self.prompt_tokens,
                    "loramux.completion_tokens": self.completion_tokens,
                },
                record_exception=False,
            ),
        ):
            used = self.prompt_tokens + self.completion_tokens
            try:
                # First the record, then the release of the quota reservation: the tokens
                # always count against the monthly quota, one way or the other.
                await run_in_threadpool(self._record)
            finally:
                try:
                    await self.app_state.limiter.finish(self.admission, used)
                except Exception:  # the record's own failure, if any, is the one to raise
                    logger.exception("rate limiter release failed for %s", self.id)

    def _record(self) -> None:
        record: dict[str, Any] = {
            "tenant_id": self.tenant_id,
            "api_key_id": self.api_key_id,
            "adapter_version_id": self.resolved.adapter_version_id,
            "request_id": self.id,
            "endpoint": f"/v1/{'chat/' if self.request.kind == 'chat' else ''}completions",
            # Always a key, so a journalled record replayed after a crash bills once.
            "billing_key": self.billing_key or self.id,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": int((time.monotonic() - self.started) * 1000),
            "status": self.status,
            "created_at": datetime.now(UTC),  # billed in the month it ran, even if replayed
        }
        try:
            with self.app_state.sessions() as session:
                record_usage(session, **record)
                session.commit()
        except Exception as error:
            if dependency_unavailable(error) is None:
                raise
            # The client has its tokens: journal the bill; the spool writes it once the
            # registry is back (usage_spool.py).
            spool_for(self.app_state.settings.home).append(record)


def _trace_finish(span: Span, out: RequestOutput) -> None:
    span.add_event(
        "finished",
        {
            "loramux.finish_reason": out.finish_reason or "",
            "loramux.output_tokens": out.num_output_tokens,
        },
    )
    span.set_attribute("loramux.finish_reason", out.finish_reason or "")
    span.set_attribute("loramux.output_tokens", out.num_output_tokens)
    if out.finish_reason == "error" and out.error is not None:
        telemetry.fail(span, out.error)


def _replace_seed(params: Any, seed: int) -> Any:
    from dataclasses import replace

    return replace(params, seed=seed % SEED_LIMIT)  # choice i of seed 2**63 - 1 wraps


def check_context(request: GenerationRequest, max_model_len: int) -> None:
    """A prompt over the context is a 400; an unspecified max_tokens shrinks to fit."""
    longest = max(len(p) for p in request.prompts)
    max_tokens = request.params.max_tokens or 0
    if longest >= max_model_len or (
        request.max_tokens_given and longest + max_tokens > max_model_len
    ):
        asked = longest + (max_tokens if request.max_tokens_given else 1)
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {asked} tokens ({longest} in the prompt, "
            f"{asked - longest} for the completion). Please reduce the prompt or max_tokens.",
            param="messages" if request.kind == "chat" else "prompt",
            code="context_length_exceeded",
        )
    if longest + max_tokens > max_model_len:
        request.params.max_tokens = max_model_len - longest


async def admit(
    app_state: AppState,
    request: GenerationRequest,
    *,
    tenant_id: str,
    api_key_id: str | None,
    priority: int = INTERACTIVE_PRIORITY,
    billing_key: str | None = None,
) -> Generation:
    """Model resolution, context check, then rate limits and the monthly quota.

    The limiter reserves the request's tokens against both the per-minute limit and the
    monthly quota, and one concurrency unit per choice; ``Generation.close`` settles them.
    """
    engine = app_state.require_engine()

    def prepare() -> tuple[ResolvedModel, Limits]:
        spool = spool_for(app_state.settings.home)
        if spool.pending():  # journalled usage counts against the quota before admitting
            spool.replay(app_state.sessions)
        with app_state.sessions() as session:
            resolved = resolve_served_model(
                session, tenant_id, request.model, app_state.base_model_id, app_state.merged
            )
            tenant = session.scalars(select(Tenant).where(Tenant.id == tenant_id)).one()
            quota = tenant.monthly_token_quota
            limits = Limits(
                tenant.requests_per_minute,
                tenant.tokens_per_minute,
                tenant.max_concurrent_requests,
                None if quota is None else quota - tokens_this_month(session, tenant_id),
            )
            return resolved, limits

    parent = otel_context.get_current()
    with telemetry.tracer().start_as_current_span(
        "loramux.admission",
        attributes={
            "loramux.tenant_id": tenant_id,
            "loramux.num_choices": request.num_choices,
            "loramux.reserved_tokens": request.reserved_tokens,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            resolved, limits = await run_in_threadpool(prepare)
            try:
                check_context(request, engine.max_model_len)
            except PromptTooLongError as error:
                raise InvalidRequest(str(error), code="context_length_exceeded") from error
            generation_id = (
                "chatcmpl-" if request.kind == "chat" else "cmpl-"
            ) + secrets.token_hex(12)
            admission = await app_state.limiter.admit(
                tenant_id, generation_id, limits, request.reserved_tokens, request.num_choices
            )
        except APIError as error:  # e.g. rate_limit_exceeded, model_not_found
            telemetry.fail(span, error, error.code or error.type)
            raise
        except Exception as error:
            telemetry.fail(span, error)
            raise
        span.set_attribute("loramux.generation_id", generation_id)
        if resolved.adapter_version_id is not None:
            span.set_attribute("loramux.adapter_version_id", resolved.adapter_version_id)
    return Generation(
        app_state,
        engine,
        request,
        resolved,
        tenant_id,
        api_key_id,
        admission,
        priority=priority,
        billing_key=billing_key,
        id=generation_id,
        trace_context=parent,
    )


def response_body(gen: Generation) -> dict[str, Any]:
    tokenizer = gen.engine.tokenizer
    want_logprobs = gen.request.params.wants_logprobs
    choices = []
    for choice in gen.choices:
        if gen.request.kind == "chat":
            choices.append(
                {
                    "index": choice.index,
                    "message": {"role": "assistant", "content": choice.text, "refusal": None},
                    "logprobs": render.chat_logprobs(tokenizer, choice.outputs)
                    if want_logprobs
                    else None,
                    "finish_reason": choice.finish_reason,
                }
            )
        else:
            choices.append(
                {
                    "index": choice.index,
                    "text": choice.text,
                    "logprobs": render.completion_logprobs(tokenizer, choice.outputs, 0)
                    if want_logprobs
                    else None,
                    "finish_reason": choice.finish_reason,
                }
            )
    return {
        "id": gen.id,
        "object": "chat.completion" if gen.request.kind == "chat" else "text_completion",
        "created": gen.created,
        "model": gen.request.model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": render.usage(gen.prompt_tokens, gen.completion_tokens),
    }
