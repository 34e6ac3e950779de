"""The platform's one way to talk to the engine.

``EngineClient`` is the interface; ``InProcessEngineClient`` runs the engine on a
background thread of this process (the embedded default). The engine sees token ids,
sampling parameters, an opaque adapter reference and a fairness key, nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from loramux.settings import Settings
from loramux.storage import Storage, adapter_key
from loramux_engine.config import EngineConfig
from loramux_engine.engine.async_engine import AsyncLLMEngine
from loramux_engine.lora.files import ADAPTER_FILES
from loramux_engine.lora.ref import AdapterRef
from loramux_engine.outputs import EngineStats, RequestOutput
from loramux_engine.sampling_params import SamplingParams

INTERACTIVE_PRIORITY = 0
BATCH_PRIORITY = 1  # served after interactive work


class EngineClient(Protocol):
    tokenizer: Any
    max_model_len: int

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        fairness_key: str,
        priority: int = INTERACTIVE_PRIORITY,
        adapter: AdapterRef | None = None,
    ) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def drop_adapter(self, ref: AdapterRef) -> None: ...

    def stats(self) -> EngineStats: ...

    def start(self) -> None: ...

    def shutdown(self) -> None: ...


class StorageAdapterSource:
    """Feeds the engine's adapter cache from object storage; keys derive from the sha256."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def fetch(self, ref: AdapterRef, dest_dir: Path) -> None:
        dest_dir.mkdir(parents=True, exist_ok=True)
        for filename in ADAPTER_FILES:
            # The engine verifies the adapter's combined sha256 once both files are here.
            self.storage.download_to(
                adapter_key(ref.sha256, filename), dest_dir / filename, expected_sha256=None
            )


class InProcessEngineClient:
    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.engine.max_model_len

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        fairness_key: str,
        priority: int = INTERACTIVE_PRIORITY,
        adapter: AdapterRef | None = None,
    ) -> AsyncIterator[RequestOutput]:
        return self.engine.generate(
            request_id, prompt_token_ids, params, fairness_key, priority, adapter
        )

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def drop_adapter(self, ref: AdapterRef) -> None:
        self.engine.drop_adapter(ref)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def start(self) -> None:
        self.engine.start()

    def shutdown(self) -> None:
        self.engine.shutdown()


def engine_config_from_settings(
    settings: Settings, storage: Storage, merged_adapter: Path | None = None
) -> EngineConfig:
    """``merged_adapter``: an adapter directory the engine merges into the base and serves
    alone (adapters/merged_serving.py), with no adapter source."""
    from loramux.base_models import resolve_model

    return EngineConfig(
        model_dir=str(resolve_model(settings.model, settings.models_dir)),
        device=settings.device,
        max_num_seqs=settings.engine_max_num_seqs,
        max_model_len=settings.engine_max_model_len,
        kv_cache_bytes=settings.engine_kv_cache_bytes,
        kv_block_size=settings.engine_kv_block_size,
        enable_prefix_caching=settings.engine_prefix_caching,
        max_num_batched_tokens=settings.engine_max_batched_tokens,
        speculative=settings.engine_speculative,
        num_speculative_tokens=settings.engine_num_speculative_tokens,
        num_threads=settings.engine_num_threads,
        quantization=settings.quantization,
        quantization_group_size=settings.quantization_group_size,
        quantize_lm_head=settings.quantize_lm_head,
        cuda_graphs=settings.engine_cuda_graphs,
        adapter_source=StorageAdapterSource(storage) if merged_adapter is None else None,
        merged_adapter=str(merged_adapter) if merged_adapter is not None else None,
        max_loras=settings.engine_max_loras,
        # uploads are validated against max_lora_rank; the engine's pool holds at least 64
        max_lora_rank=max(settings.max_lora_rank, 64),
        adapter_device_bytes=settings.adapter_device_bytes,
        adapter_host_bytes=settings.adapter_host_bytes,
        adapter_disk_bytes=settings.adapter_disk_bytes,
        adapter_cache_dir=str(settings.resolved_adapter_cache_dir),
    )


def engine_client_from_settings(
    settings: Settings, storage: Storage, merged_adapter: Path | None = None
) -> EngineClient:
    config = engine_config_from_settings(settings, storage, merged_adapter)
    return InProcessEngineClient(AsyncLLMEngine.from_config(config))
