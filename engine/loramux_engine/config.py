"""Engine configuration: one slotted dataclass that validates itself."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from loramux_engine.errors import EngineConfigError
from loramux_engine.layers.quant import INT4_GROUP_SIZES, QUANTIZATION_MODES

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class EngineConfig:
    model_dir: str
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: the model's context, capped by the KV cache
    kv_cache_bytes: int = 1 << 30
    kv_block_size: int = 16  # tokens per KV cache block, a power of two (engine/kv_cache.py)
    enable_prefix_caching: bool = True  # reuse full blocks of a tenant's earlier prompts
    # Speculative decoding by prompt lookup (engine/spec_decode.py): "off", "on", or "auto"
    # (a sequence drafts while its drafts pay, in small steps); a request's own
    # `speculative` field overrides it. Drafts per sequence and step at most, and in "auto"
    # the most tokens a drafting step may run (None: by device, spec_decode.py).
    speculative: str = "auto"
    num_speculative_tokens: int = 8
    speculative_max_batch_tokens: int | None = None
    max_num_batched_tokens: int = 2048
    # CPU intra-op threads, fixed; None: one per CPU this process may use (affinity, cgroup
    # quota), fewer while other processes keep some busy (engine/thread_team.py)
    num_threads: int | None = None
    cpu_decode_kernel: bool = True  # the compiled decode attention on CPU in fp32
    cpu_onednn_matmul: bool = True  # projections through oneDNN on CPU in fp32 (layers/linear.py)
    cpu_gemv_kernel: bool = True  # steps of <= 64 tokens through kernels/gemv.c (CPU, fp32)
    # Weight-only quantization of the projections and the LM head (layers/quant.py): "none",
    # "int8" (per output channel) or "int4" (groups of quantization_group_size, Q4_1-style).
    quantization: str = "none"
    quantization_group_size: int = 32
    quantize_lm_head: bool = True  # False: the LM head stays in the activation dtype
    # Decode steps replayed from CUDA graphs, one per batch-size bucket (engine/cuda_graphs.py);
    # on CUDA with the Triton kernels only, ignored elsewhere.
    cuda_graphs: bool = True
    # Multi-LoRA: an AdapterSource (lora/source.py) turns it on; without one, a request
    # naming an adapter is refused.
    adapter_source: object | None = None
    max_loras: int = 16  # device slots for resident adapters (slot 0, "no adapter", extra)
    max_lora_rank: int = 64
    adapter_device_bytes: int | None = None  # when set, caps the slots to what it pays for
    adapter_host_bytes: int = 1 << 30
    adapter_disk_bytes: int = 8 << 30
    adapter_cache_dir: str | None = None  # None: a temporary directory owned by the engine
    adapter_loader_threads: int = 2
    adapter_failure_ttl_s: float = 30.0  # a failed load is not retried for this long
    # A PEFT adapter directory merged into the base weights at load (lora/merge.py): the
    # engine then serves that one adapter as its base model, with no LoRA cost; requests
    # carry no adapter. Excludes adapter_source (any other adapter would run on top of it).
    merged_adapter: str | None = None

    def __post_init__(self) -> None:
        if not os.path.isfile(os.path.join(self.model_dir, "config.json")):
            raise EngineConfigError(f"no config.json in model_dir {self.model_dir!r}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise EngineConfigError(f"device must be auto, cpu or cuda[:N], not {self.device!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise EngineConfigError(f"dtype must be one of {sorted(_DTYPES)}, not {self.dtype!r}")
        for name in ("max_num_seqs", "kv_cache_bytes", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name} must be positive")
        size = self.kv_block_size
        if not 1 <= size <= 1024 or size & (size - 1):
            raise EngineConfigError(f"kv_block_size must be a power of two up to 1024, not {size}")
        if self.speculative not in ("off", "on", "auto"):
            raise EngineConfigError(
                f"speculative must be off, on or auto, not {self.speculative!r}"
            )
        if not 1 <= self.num_speculative_tokens <= 64:
            raise EngineConfigError("num_speculative_tokens must be in 1..64")
        if self.speculative_max_batch_tokens is not None and self.speculative_max_batch_tokens < 1:
            raise EngineConfigError("speculative_max_batch_tokens must be positive")
        if self.quantization not in QUANTIZATION_MODES:
            raise EngineConfigError(
                f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, "
                f"not {self.quantization!r}"
            )
        if self.quantization_group_size not in INT4_GROUP_SIZES:
            raise EngineConfigError(
                f"quantization_group_size must be one of {INT4_GROUP_SIZES}, "
                f"not {self.quantization_group_size}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise EngineConfigError("max_model_len must be at least 2")
        if self.num_threads is not None and self.num_threads < 1:
            raise EngineConfigError("num_threads must be positive")
        for name in ("max_loras", "adapter_loader_threads"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name} must be positive")
        if self.max_lora_rank < 64:
            raise EngineConfigError("max_lora_rank must be at least 64")
        for name in ("adapter_host_bytes", "adapter_disk_bytes", "adapter_failure_ttl_s"):
            if getattr(self, name) < 0:
                raise EngineConfigError(f"{name} must not be negative")
        if self.merged_adapter is not None:
            if self.adapter_source is not None:
                raise EngineConfigError(
                    "merged_adapter and adapter_source exclude each other: a merged engine "
                    "serves its one adapter, and another adapter would apply on top of it"
                )
            if not os.path.isfile(os.path.join(self.merged_adapter, "adapter_config.json")):
                raise EngineConfigError(
                    f"no adapter_config.json in merged_adapter {self.merged_adapter!r}"
                )

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EngineConfigError("device is cuda but no CUDA device is available")
        return device

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype is None:
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]
