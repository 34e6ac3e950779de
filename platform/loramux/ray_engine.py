"""``EngineClient`` over a Ray Serve deployment handle: the engine runs in Serve replicas.

``generate`` streams from the engine deployment (``loramux.ray_serve.engine``) with the
adapter's version id as Serve's multiplexed model id, so the request goes to a replica that
already holds the adapter. A client that stops listening cancels the call, which aborts the
request in the replica's engine. Engine errors come back as the exceptions the in-process
client raises; a request that finds no replica within ``ray_replica_wait_s`` (scaled to
zero and still starting, or all busy), or whose replica died, is a 503 with Retry-After.

Needs the ``ray`` extra: ``pip install 'loramux[ray]'``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import (
    DeploymentHandle,
    DeploymentResponse,
    DeploymentResponseGenerator,
)

from loramux.engine_client import INTERACTIVE_PRIORITY
from loramux.errors import ServiceUnavailable
from loramux.ray_serve.wire import Accepted, EngineFailure, ReplicaStats, decode_error
from loramux.settings import Settings
from loramux_engine.engine.kv_cache import kv_cache_capacity
from loramux_engine.lora.ref import AdapterRef
from loramux_engine.models.config import load_model_args
from loramux_engine.outputs import EngineStats, RequestOutput
from loramux_engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# A replica not heard from for this long no longer counts in stats() (scaled down, died).
STATS_TTL_S = 60.0
DROP_TIMEOUT_S = 30.0


class RayEngineClient:
    def __init__(
        self,
        handle: DeploymentHandle,
        tokenizer: Any,
        max_model_len: int,
        *,
        replica_wait_s: float,
        route_by_adapter: bool = True,
    ) -> None:
        """``route_by_adapter=False`` sends no multiplexed model id: Serve's plain routing,
        each replica loading whatever adapter it gets (the comparison ``bench scale`` makes)."""
        self.handle = handle
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.replica_wait_s = replica_wait_s
        self.route_by_adapter = route_by_adapter
        self._replicas: dict[str, tuple[float, EngineStats]] = {}
        self._drops: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(
        cls, settings: Settings, handle: DeploymentHandle | None = None
    ) -> RayEngineClient:
        """The client for ``settings``; without a handle, the deployed app's (Ray connected)."""
        from transformers import AutoTokenizer

        from loramux.base_models import resolve_model
        from loramux.ray_serve.config import ENGINE_DEPLOYMENT

        if handle is None:
            from ray import serve

            handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, settings.ray_app_name)
        model_dir = resolve_model(settings.model, settings.models_dir)
        return cls(
            handle,
            AutoTokenizer.from_pretrained(str(model_dir)),
            expected_max_model_len(settings, model_dir),
            replica_wait_s=settings.ray_replica_wait_s,
        )

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        fairness_key: str,
        priority: int = INTERACTIVE_PRIORITY,
        adapter: AdapterRef | None = None,
    ) -> AsyncIterator[RequestOutput]:
        options: dict[str, Any] = {"stream": True}
        if adapter is not None and self.route_by_adapter:
            options["multiplexed_model_id"] = adapter.id
        response = cast(
            DeploymentResponseGenerator[Any],
            self.handle.options(**options).generate.remote(
                request_id, prompt_token_ids, params, fairness_key, priority, adapter
            ),
        )
        done = False
        try:
            try:
                accepted = await asyncio.wait_for(anext(response), self.replica_wait_s)
            except TimeoutError:
                logger.warning(
                    "no engine replica took request %s within %.0f s",
                    request_id,
                    self.replica_wait_s,
                )
                raise ServiceUnavailable(
                    "No inference engine is available yet; please retry shortly.",
                    code="engine_unavailable",
                ) from None
            if isinstance(accepted, Accepted):
                self.max_model_len = accepted.max_model_len
                self._note(accepted.replica_id, accepted.stats)
            async for item in response:
                if isinstance(item, EngineFailure):
                    done = True
                    raise decode_error(item)
                if isinstance(item, ReplicaStats):
                    self._note(item.replica_id, item.stats)
                    continue
                done = done or item.finished
                yield item
            done = True
        except (RayError, RayServeException, StopAsyncIteration) as error:
            done = True
            logger.warning("engine call for request %s failed: %r", request_id, error)
            raise ServiceUnavailable(
                "The inference engine could not serve this request; please retry.",
                code="engine_unavailable",
            ) from None
        finally:
            if not done:  # the caller left: cancelling the call aborts it in the engine
                response.cancel()

    def abort(self, request_id: str) -> None:
        """Closing the stream of ``generate`` cancels its call, which aborts the request."""

    def drop_adapter(self, ref: AdapterRef) -> None:
        # To the replica that holds it (Serve's routing by adapter version id). Others that
        # served it once age it out of their caches: no request resolves to it any more.
        response = cast(
            DeploymentResponse[Any],
            self.handle.options(multiplexed_model_id=ref.id).drop_adapter.remote(ref),
        )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop here: wait for it
            response.result(timeout_s=DROP_TIMEOUT_S)
            return
        # A response nobody awaits is never sent: a task awaits it, held until it is done.
        task = loop.create_task(self._dropped(response, ref))
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    async def _dropped(self, response: DeploymentResponse[Any], ref: AdapterRef) -> None:
        try:
            await asyncio.wait_for(response, DROP_TIMEOUT_S)
        except Exception:  # the adapter is deleted either way; the replicas' LRU ages it out
            logger.warning("engine replicas could not drop adapter version %s", ref.id)

    def stats(self) -> EngineStats:
        """The replicas' latest stats (each sends its own with every request), summed."""
        now = time.monotonic()
        for replica_id, (seen, _) in list(self._replicas.items()):
            if now - seen > STATS_TTL_S:
                del self._replicas[replica_id]
        return sum_stats([stats for _, stats in self._replicas.values()])

    def replica_stats(self) -> dict[str, EngineStats]:
        return {replica_id: stats for replica_id, (_, stats) in self._replicas.items()}

    async def poll_replica_stats(
        self, num_replicas: int, attempts: int = 200
    ) -> dict[str, EngineStats]:
        """Each replica's stats now, asked until ``num_replicas`` have answered.

        A call without a model id goes to any replica, so it is repeated until every one
        has been reached; the answers are noted for ``stats()`` too.
        """
        states: dict[str, EngineStats] = {}
        for _ in range(attempts):
            state = await self.handle.replica_stats.remote()
            self._note(state.replica_id, state.stats)
            states[state.replica_id] = state.stats
            if len(states) >= num_replicas:
                return states
        raise RuntimeError(f"{len(states)} of {num_replicas} engine replicas answered")

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def _note(self, replica_id: str, stats: EngineStats) -> None:
        self._replicas[replica_id] = (time.monotonic(), stats)


def connect(settings: Settings) -> RayEngineClient:
    """The engine deployment of a running loramux Serve app, from a process outside it.

    For ``loramux serve`` with ``LORAMUX_ENGINE_BACKEND=ray`` and a batch worker: joins the
    cluster at ``ray_address`` (or ``RAY_ADDRESS``) unless this process already has.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=settings.ray_address or "auto")
    return RayEngineClient.from_settings(settings)


def sum_stats(all_stats: list[EngineStats]) -> EngineStats:
    total = EngineStats()
    for stats in all_stats:
        for field in dataclasses.fields(EngineStats):
            value = getattr(stats, field.name)
            if isinstance(value, int | float) and field.name not in ("kv_cache_usage",):
                setattr(total, field.name, getattr(total, field.name) + value)
        for key, value in stats.extra.items():
            total.extra[key] = total.extra.get(key, 0.0) + value
        for by_key, add in (
            (total.num_running_by_key, stats.num_running_by_key),
            (total.num_waiting_by_key, stats.num_waiting_by_key),
        ):
            for key, count in add.items():
                by_key[key] = by_key.get(key, 0) + count
        total.resident_adapters += stats.resident_adapters
    if all_stats:
        total.kv_block_size = max(s.kv_block_size for s in all_stats)
    if total.kv_blocks_total:
        total.kv_cache_usage = total.kv_blocks_used / total.kv_blocks_total
    return total


def expected_max_model_len(settings: Settings, model_dir: Path) -> int:
    """The engine replicas' context length, as ``LLMEngine`` sizes it, before one answers.

    The first replica to take a request replaces it with its own; the engine checks every
    prompt against its own in any case. Replicas given GPUs use bf16 (half the KV bytes).
    """
    device = settings.device
    on_cuda = device.startswith("cuda") or (device == "auto" and settings.ray_engine_num_gpus > 0)
    _, max_model_len = kv_cache_capacity(
        load_model_args(str(model_dir)),
        2 if on_cuda else 4,
        settings.engine_kv_cache_bytes,
        settings.engine_kv_block_size,
        settings.engine_max_model_len,
    )
    return max_model_len
