"""Adapters whose values are finite in the file but overflow once served.

Each is a real PEFT adapter's two files with one change; validation must reject it with
the reason given (a substring of the version's ``reason``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from loramux_engine.lora.files import CONFIG_NAME, WEIGHTS_NAME


@dataclass(frozen=True, slots=True)
class HostileAdapter:
    config: bytes
    weights: bytes
    reason: str


def _set(name_part: str, dtype: torch.dtype | None, **values: float) -> Callable[..., Any]:
    """Set [0, 0] of the first A (a=) and B (b=) whose name has `name_part`, in `dtype`."""

    def change(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if dtype is not None:
            tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
        for which, value in values.items():
            suffix = {"a": "lora_A.weight", "b": "lora_B.weight"}[which]
            name = sorted(n for n in tensors if name_part in n and n.endswith(suffix))[0]
            tensors[name] = tensors[name].clone()
            tensors[name][0, 0] = value
        return tensors

    return change


# name -> (config changes, weights change, reason)
_HOSTILE: dict[str, tuple[dict[str, Any], Callable[..., Any] | None, str]] = {
    "alpha-1e300": ({"lora_alpha": 1e300}, None, "LoRA scale of model.layers.0"),
    "alpha-pattern": (
        {"alpha_pattern": {"v_proj": 1e6}},
        None,
        "LoRA scale of model.layers.0.self_attn.v_proj",
    ),
    "f32-1e18": ({}, _set("q_proj", torch.float32, b=1e18), "weight of magnitude 1e+18"),
    "f64-1e300": ({}, _set("q_proj", torch.float64, a=1e300), "weight of magnitude 1e+300"),
    "f16-max": ({}, _set("q_proj", torch.float16, b=65504.0), "weight of magnitude 6.55e+04"),
    "bf16-max": (
        {},
        _set("v_proj", torch.bfloat16, a=torch.finfo(torch.bfloat16).max),
        "weight of magnitude 3.39e+38",
    ),
    "big-update": ({}, _set("q_proj", None, a=100.0, b=100.0), "is too large"),
}


def hostile_adapters(adapter_dir: Path) -> dict[str, HostileAdapter]:
    """Every hostile variant of the adapter in `adapter_dir`, by a name usable for uploads."""
    config = json.loads((adapter_dir / CONFIG_NAME).read_bytes())
    weights = (adapter_dir / WEIGHTS_NAME).read_bytes()
    made = {}
    for name, (config_changes, change, reason) in _HOSTILE.items():
        new_weights = weights if change is None else save(change(load(weights)))
        new_config = json.dumps(config | config_changes).encode()
        made[name] = HostileAdapter(new_config, new_weights, reason)
    return made
