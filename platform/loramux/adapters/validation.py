"""The full check of an adapter's two files against the base model, with bounded memory.

In order, each step before any data the next one reads: the config (upload rules, then
the engine's resolution against the base model), the safetensors header (structure, then
the engine's names and shapes), then the values, one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from loramux.adapters.config_check import MAX_CONFIG_BYTES, check_config_bytes
from loramux.adapters.errors import AdapterRejected
from loramux_engine.lora.adapter import check_values, check_weights_header
from loramux_engine.lora.errors import UnsupportedAdapterError
from loramux_engine.lora.files import WEIGHTS_NAME
from loramux_engine.lora.peft_config import ResolvedLoRAConfig
from loramux_engine.lora.safetensors_header import read_header_stream
from loramux_engine.lora.shape import BaseModelShape


@dataclass(frozen=True, slots=True)
class ValidatedAdapter:
    rank: int
    alpha: float
    target_modules: list[str]


def validate_adapter_files(
    config_path: Path, weights_path: Path, shape: BaseModelShape, max_rank: int
) -> ValidatedAdapter:
    """Raise ``AdapterRejected`` with the reason, or describe the adapter the engine will see."""
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterRejected(f"adapter_config.json is over {MAX_CONFIG_BYTES} bytes")
    summary = check_config_bytes(config_path.read_bytes(), shape, max_rank)
    resolved = summary.resolved
    try:
        with weights_path.open("rb") as stream:
            header = read_header_stream(
                stream, weights_path.stat().st_size, max_tensors=shape.max_adapter_tensors
            )
        check_weights_header(resolved, header, shape)
    except UnsupportedAdapterError as error:
        raise AdapterRejected(str(error)) from None
    _check_values(resolved, weights_path)
    return ValidatedAdapter(
        rank=summary.rank, alpha=summary.alpha, target_modules=summary.target_modules
    )


def _check_values(resolved: ResolvedLoRAConfig, weights_path: Path) -> None:
    """The engine's own value check (finite, and bounded for every serving dtype)."""
    try:
        with safe_open(str(weights_path), framework="pt") as weights:
            # A generator: check_values holds one tensor at a time.
            names = list(weights.keys())  # noqa: SIM118 - safe_open is not a mapping
            check_values(resolved, ((name, weights.get_tensor(name)) for name in names))
    except UnsupportedAdapterError as error:
        raise AdapterRejected(str(error)) from None
    except SafetensorError as error:
        raise AdapterRejected(f"{WEIGHTS_NAME} cannot be read: {error}") from None
