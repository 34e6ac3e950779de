"""Multi-LoRA for the engine: adapter parsing, the slot pool, the op and the adapter cache.

The platform names an adapter with an AdapterRef (opaque id + sha256) and implements an
AdapterSource; the engine owns an AdapterCache over a LoRASlotPool, and each projection
calls add_lora with its pool stack and the step's LoRABatch.
"""

from loramux_engine.lora.adapter import LoRAAdapter, LoRAWeights, parse_adapter, read_adapter_dir
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
