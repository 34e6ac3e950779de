"""loramux_engine: a continuous-batching multi-LoRA engine for LLaMA-family models.

The engine knows nothing of tenants, HTTP, SQL or object storage.
"""

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
