"""loramux_engine: a continuous-batching multi-LoRA engine for LLaMA-family models.

The engine knows nothing of tenants, HTTP, SQL or object storage.

Names are imported on first use (PEP 562), so that a light submodule such as
``loramux_engine.lora.files`` can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loramux_engine.config import EngineConfig
    from loramux_engine.engine.async_engine import AsyncLLMEngine
    from loramux_engine.engine.llm_engine import LLMEngine
    from loramux_engine.errors import (
        AdapterRequestError,
        EngineConfigError,
        InvalidSamplingParamsError,
        ModelLoadError,
        PromptTooLongError,
    )
    from loramux_engine.outputs import EngineStats, RequestOutput
    from loramux_engine.sampling_params import SamplingParams

_EXPORTS = {
    "EngineConfig": "loramux_engine.config",
    "AsyncLLMEngine": "loramux_engine.engine.async_engine",
    "LLMEngine": "loramux_engine.engine.llm_engine",
    "AdapterRequestError": "loramux_engine.errors",
    "EngineConfigError": "loramux_engine.errors",
    "InvalidSamplingParamsError": "loramux_engine.errors",
    "ModelLoadError": "loramux_engine.errors",
    "PromptTooLongError": "loramux_engine.errors",
    "EngineStats": "loramux_engine.outputs",
    "RequestOutput": "loramux_engine.outputs",
    "SamplingParams": "loramux_engine.sampling_params",
}
__all__ = [
    "AdapterRequestError",
    "AsyncLLMEngine",
    "EngineConfig",
    "EngineConfigError",
    "EngineStats",
    "InvalidSamplingParamsError",
    "LLMEngine",
    "ModelLoadError",
    "PromptTooLongError",
    "RequestOutput",
    "SamplingParams",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
