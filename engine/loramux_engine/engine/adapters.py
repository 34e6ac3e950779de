"""The engine's multi-LoRA set-up: the slot pool and the adapter cache, from the config."""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import cast

import torch

from loramux_engine.config import EngineConfig
from loramux_engine.errors import AdapterRequestError, EngineConfigError
from loramux_engine.lora.cache import AdapterCache
from loramux_engine.lora.pool import LoRASlotPool
from loramux_engine.lora.ref import AdapterRef
from loramux_engine.lora.shape import BaseModelShape
from loramux_engine.lora.source import AdapterSource


def build_adapter_cache(
    config: EngineConfig, dtype: torch.dtype, device: torch.device
) -> AdapterCache | None:
    """The cache over a fresh slot pool, or None when the config has no adapter source."""
    if config.adapter_source is None:
        return None
    model_config = json.loads(Path(config.model_dir, "config.json").read_text())
    shape = BaseModelShape.from_hf_config(model_config)
    num_slots = config.max_loras + 1
    if config.adapter_device_bytes is not None:
        affordable = LoRASlotPool.slots_for_budget(
            shape, config.max_lora_rank, dtype, config.adapter_device_bytes
        )
        num_slots = min(num_slots, affordable)
        if num_slots < 2:
            raise EngineConfigError(
                f"adapter_device_bytes {config.adapter_device_bytes} does not pay for one "
                f"rank-{config.max_lora_rank} adapter slot"
            )
    pool = LoRASlotPool(shape, num_slots, config.max_lora_rank, device, dtype)
    if config.adapter_cache_dir is not None:
        disk_dir = Path(config.adapter_cache_dir)
    else:
        disk_dir = Path(tempfile.mkdtemp(prefix="loramux-adapters-"))
    cache = AdapterCache(
        pool,
        cast(AdapterSource, config.adapter_source),
        host_budget_bytes=config.adapter_host_bytes,
        disk_dir=disk_dir,
        disk_budget_bytes=config.adapter_disk_bytes,
        failure_ttl_s=config.adapter_failure_ttl_s,
        num_loader_threads=config.adapter_loader_threads,
    )
    if config.adapter_cache_dir is None:
        weakref.finalize(cache, shutil.rmtree, disk_dir, ignore_errors=True)
    return cache


def check_adapter(adapter: object | None, cache: AdapterCache | None) -> None:
    if adapter is None:
        return
    if not isinstance(adapter, AdapterRef):
        raise AdapterRequestError(f"adapter must be an AdapterRef, not {type(adapter).__name__}")
    if cache is None:
        raise AdapterRequestError(
            f"adapter {adapter.id} was requested but this engine serves no adapters "
            "(it was built without an adapter_source)"
        )


def adapter_cache_stats(cache: AdapterCache | None) -> dict[str, float]:
    """Flat counters for EngineStats.extra: adapter_cache_<tier>_<counter>."""
    if cache is None:
        return {}
    extra = {
        f"adapter_cache_{tier}_{name}": float(value)
        for tier, counters in cache.stats().items()
        for name, value in counters.items()
    }
    extra["adapter_cache_num_resident"] = extra["adapter_cache_device_resident"]
    return extra
