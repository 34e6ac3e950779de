"""The engine deployment: each replica holds the base model once and streams the engine.

Requests for an adapter carry its version id as Serve's multiplexed model id; a replica
that serves one registers it (``serve.multiplexed``, bounded by the engine's device slots),
so Serve routes the adapter's later requests to a replica that already holds it. Base-model
requests carry no id and go to any replica. The adapter itself loads through the engine's
own cache (device slots, host LRU, disk) as in the embedded engine; Serve's list is only
where to route.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any, cast

from ray import serve
from ray.serve import Deployment

from loramux.engine_client import InProcessEngineClient, engine_config_from_settings
from loramux.ray_serve.config import settings_from_payload
from loramux.ray_serve.wire import Accepted, EngineFailure, ReplicaStats, encode_error
from loramux.storage import storage_from_settings
from loramux_engine.engine.async_engine import AsyncLLMEngine
from loramux_engine.lora.ref import AdapterRef
from loramux_engine.outputs import RequestOutput
from loramux_engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def claim_adapter_cache_dir(root: Path) -> tuple[Path, IO[str]]:
    """A disk-tier directory for this replica alone, held by a lock while it lives.

    The disk tier belongs to one process (it clears its staging area at start and replaces
    entries in place), and replicas on one node share the node's cache root. The lowest
    free ``replica-N`` is reused after a replica ends, however it ends, so the adapters it
    fetched stay warm for the next one and no directory is left behind per replica.
    """
    root.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        lock = (root / f"replica-{n}.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        return root / f"replica-{n}", lock
    raise AssertionError("unreachable")


class EngineReplica:
    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        settings_here = settings_from_payload(settings)
        cache_dir, self._cache_lock = claim_adapter_cache_dir(
            settings_here.resolved_adapter_cache_dir
        )
        self.settings = settings_here.model_copy(update={"adapter_cache_dir": cache_dir})
        config = engine_config_from_settings(self.settings, storage_from_settings(self.settings))
        self.engine = InProcessEngineClient(AsyncLLMEngine.from_config(config))
        self.engine.start()
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context is not None else "local"

        async def hold_adapter(adapter_version_id: str) -> str:
            return adapter_version_id

        # A closure, not a method, so the bound comes from settings: one entry per slot.
        self._hold_adapter = serve.multiplexed(
            max_num_models_per_replica=self.settings.engine_max_loras
        )(hold_adapter)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        fairness_key: str,
        priority: int,
        adapter: AdapterRef | None,
    ) -> AsyncIterator[Accepted | RequestOutput | EngineFailure | ReplicaStats]:
        yield Accepted(self.replica_id, self.engine.max_model_len, self.engine.stats())
        try:
            if adapter is not None:
                await self._hold_adapter(serve.get_multiplexed_model_id() or adapter.id)
            async for out in self.engine.generate(
                request_id,
                prompt_token_ids,
                params,
                fairness_key=fairness_key,
                priority=priority,
                adapter=adapter,
            ):
                if out.error is not None:
                    yield encode_error(out.error)
                    return
                yield out
        except Exception as error:  # the request's own failure, or the engine's
            yield encode_error(error)
            return
        yield ReplicaStats(self.replica_id, self.engine.stats())

    async def drop_adapter(self, ref: AdapterRef) -> None:
        self.engine.drop_adapter(ref)

    async def replica_stats(self) -> ReplicaStats:
        return ReplicaStats(self.replica_id, self.engine.stats())

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


EngineDeployment = cast(Deployment, serve.deployment(EngineReplica))
