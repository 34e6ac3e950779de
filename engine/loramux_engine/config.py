"""Engine configuration: one slotted dataclass that validates itself."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from loramux_engine.errors import EngineConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class EngineConfig:
    model_dir: str
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: the model's context, capped by the KV cache
    kv_cache_bytes: int = 1 << 30
    max_num_batched_tokens: int = 2048
    num_threads: int | None = None  # CPU intra-op threads; None keeps torch's default
    cpu_decode_kernel: bool = True  # the compiled decode attention on CPU in fp32
    # Opaque handle the LoRA layer uses to fetch adapters; the base engine never reads it.
    adapter_source: object | None = None

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
        if self.max_model_len is not None and self.max_model_len < 2:
            raise EngineConfigError("max_model_len must be at least 2")
        if self.num_threads is not None and self.num_threads < 1:
            raise EngineConfigError("num_threads must be positive")

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
