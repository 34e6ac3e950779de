"""A parsed LoRA adapter: per adapted projection its A, B and PEFT scale, on the host.

Every check runs here, before any weight can reach a slot pool: the config (see
peft_config), then the safetensors header (names, dtypes, shapes), then the values
(see values: finite and bounded, so that they stay finite in every serving dtype).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loramux_engine.lora.errors import UnsupportedAdapterError
from loramux_engine.lora.files import CONFIG_NAME, WEIGHTS_NAME
from loramux_engine.lora.peft_config import ResolvedLoRAConfig, resolve_peft_config
from loramux_engine.lora.safetensors_header import TensorEntry, read_header
from loramux_engine.lora.shape import BaseModelShape, module_key
from loramux_engine.lora.values import check_lora_scales, check_lora_values, tensor_absmax
from loramux_engine.utils import bounded_json

# What PEFT's save_pretrained writes for a LlamaForCausalLM: the module key under the
# PeftModel's `base_model.model.` prefix, then lora_A / lora_B.
TENSOR_PREFIX = "base_model.model."


@dataclass(frozen=True, slots=True)
class LoRAWeights:
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True, slots=True, eq=False)
class LoRAAdapter:
    """A validated adapter; `weights` holds only the projections it adapts."""

    config: ResolvedLoRAConfig
    weights: dict[tuple[int, str], LoRAWeights]
    num_bytes: int


def tensor_names(layer: int, projection: str) -> tuple[str, str]:
    base = TENSOR_PREFIX + module_key(layer, projection)
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight"


def parse_config_bytes(config_bytes: bytes) -> Mapping[str, Any]:
    try:
        # Tenant JSON: nesting, integer length and non-finite numbers bounded.
        config = bounded_json.loads(config_bytes)
    except bounded_json.JSONLimitError as error:
        raise UnsupportedAdapterError(
            f"unsupported adapter: adapter_config.json is not valid JSON ({error})"
        ) from error
    if not isinstance(config, dict):
        raise UnsupportedAdapterError("unsupported adapter: adapter_config.json is not an object")
    return config


def check_weights_header(
    resolved: ResolvedLoRAConfig, header: Mapping[str, TensorEntry], shape: BaseModelShape
) -> None:
    """Names and shapes in the header must be exactly the config's targets, no more."""
    expected: dict[str, tuple[int, int]] = {}
    for (layer, projection), target in resolved.targets.items():
        in_features, out_features = shape.features(projection)
        name_a, name_b = tensor_names(layer, projection)
        expected[name_a] = (target.rank, in_features)
        expected[name_b] = (out_features, target.rank)
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing:
        raise UnsupportedAdapterError(
            f"unsupported adapter: {len(missing)} tensors the config implies are missing, "
            f"e.g. {missing[0]!r}"
        )
    if extra:
        raise UnsupportedAdapterError(
            f"unsupported adapter: {len(extra)} tensors are not LoRA weights of the targeted "
            f"projections, e.g. {extra[0]!r}"
        )
    for name, want in expected.items():
        if header[name].shape != want:
            raise UnsupportedAdapterError(
                f"unsupported adapter: {name!r} has shape {list(header[name].shape)}, the base "
                f"model and the config's rank need {list(want)}"
            )


def parse_adapter(
    config: bytes | Mapping[str, Any],
    weights_bytes: bytes,
    shape: BaseModelShape,
    max_rank: int,
) -> LoRAAdapter:
    """Validate and load an adapter from its two files' contents."""
    if isinstance(config, bytes):
        config = parse_config_bytes(config)
    resolved = resolve_peft_config(config, shape, max_rank)
    check_weights_header(
        resolved, read_header(weights_bytes, max_tensors=shape.max_adapter_tensors), shape
    )
    try:
        tensors = load_safetensors(weights_bytes)
    except SafetensorError as error:
        raise UnsupportedAdapterError(
            f"unsupported adapter: adapter_model.safetensors cannot be read: {error}"
        ) from error
    check_values(resolved, tensors.items())
    weights: dict[tuple[int, str], LoRAWeights] = {}
    for (layer, projection), target in resolved.targets.items():
        name_a, name_b = tensor_names(layer, projection)
        weights[(layer, projection)] = LoRAWeights(
            a=tensors[name_a], b=tensors[name_b], scale=target.scale
        )
    num_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return LoRAAdapter(config=resolved, weights=weights, num_bytes=num_bytes)


def check_values(resolved: ResolvedLoRAConfig, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """The adapter's values against lora.values' bounds, one tensor at a time.

    ``tensors`` may be a generator that reads each tensor only when asked (the platform's
    validator does), so no more than one is held here at once.
    """
    check_lora_scales(resolved)  # from the config alone, before any tensor is read
    absmax = {name: tensor_absmax(name, tensor) for name, tensor in tensors}
    maxima: dict[tuple[int, str], tuple[float, float]] = {}
    for key in resolved.targets:
        name_a, name_b = tensor_names(*key)
        maxima[key] = (absmax[name_a], absmax[name_b])
    check_lora_values(resolved, maxima)


def read_adapter_dir(path: Path, shape: BaseModelShape, max_rank: int) -> LoRAAdapter:
    return parse_adapter(
        (path / CONFIG_NAME).read_bytes(), (path / WEIGHTS_NAME).read_bytes(), shape, max_rank
    )
