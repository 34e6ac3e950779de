"""Multi-LoRA for the engine: adapter parsing, the slot pool, the op and the adapter cache.

The platform names an adapter with an AdapterRef (opaque id + sha256) and implements an
AdapterSource; the engine owns an AdapterCache over a LoRASlotPool, and each projection
calls add_lora with its pool stack and the step's LoRABatch.

Names are imported on first use (PEP 562), so that a light submodule such as
``loramux_engine.lora.files`` can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loramux_engine.lora.adapter import (
        LoRAAdapter,
        LoRAWeights,
        parse_adapter,
        read_adapter_dir,
    )
    from loramux_engine.lora.cache import AdapterCache
    from loramux_engine.lora.errors import (
        AdapterIntegrityError,
        AdapterLoadError,
        UnsupportedAdapterError,
    )
    from loramux_engine.lora.ops import LoRABatch, LoRAStack, add_lora
    from loramux_engine.lora.peft_config import ResolvedLoRAConfig, resolve_peft_config
    from loramux_engine.lora.pool import LoRASlotPool, bytes_per_slot
    from loramux_engine.lora.ref import AdapterRef, adapter_sha256, combine_file_digests
    from loramux_engine.lora.shape import PROJECTIONS, BaseModelShape
    from loramux_engine.lora.source import AdapterSource, DirectorySource

_EXPORTS = {
    "LoRAAdapter": "loramux_engine.lora.adapter",
    "LoRAWeights": "loramux_engine.lora.adapter",
    "parse_adapter": "loramux_engine.lora.adapter",
    "read_adapter_dir": "loramux_engine.lora.adapter",
    "AdapterCache": "loramux_engine.lora.cache",
    "AdapterIntegrityError": "loramux_engine.lora.errors",
    "AdapterLoadError": "loramux_engine.lora.errors",
    "UnsupportedAdapterError": "loramux_engine.lora.errors",
    "LoRABatch": "loramux_engine.lora.ops",
    "LoRAStack": "loramux_engine.lora.ops",
    "add_lora": "loramux_engine.lora.ops",
    "ResolvedLoRAConfig": "loramux_engine.lora.peft_config",
    "resolve_peft_config": "loramux_engine.lora.peft_config",
    "LoRASlotPool": "loramux_engine.lora.pool",
    "bytes_per_slot": "loramux_engine.lora.pool",
    "AdapterRef": "loramux_engine.lora.ref",
    "adapter_sha256": "loramux_engine.lora.ref",
    "combine_file_digests": "loramux_engine.lora.ref",
    "PROJECTIONS": "loramux_engine.lora.shape",
    "BaseModelShape": "loramux_engine.lora.shape",
    "AdapterSource": "loramux_engine.lora.source",
    "DirectorySource": "loramux_engine.lora.source",
}
__all__ = [
    "PROJECTIONS",
    "AdapterCache",
    "AdapterIntegrityError",
    "AdapterLoadError",
    "AdapterRef",
    "AdapterSource",
    "BaseModelShape",
    "DirectorySource",
    "LoRAAdapter",
    "LoRABatch",
    "LoRASlotPool",
    "LoRAStack",
    "LoRAWeights",
    "ResolvedLoRAConfig",
    "UnsupportedAdapterError",
    "adapter_sha256",
    "add_lora",
    "bytes_per_slot",
    "combine_file_digests",
    "parse_adapter",
    "read_adapter_dir",
    "resolve_peft_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
