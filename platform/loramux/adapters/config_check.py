"""Checks on ``adapter_config.json``, all made at upload, before anything is stored.

After the rules that need no base model, the engine's ``resolve_peft_config`` resolves the
config against the base model's module names: unsupported PEFT features (DoRA, ...),
targets that match nothing, and module name patterns outside the bounded matcher's subset
are refused at once, and what is stored is the resolved list of modules. No tenant
pattern is ever run by ``re`` (see loramux_engine.lora.patterns).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from loramux.adapters.errors import AdapterRejected
from loramux_engine.lora.adapter import parse_config_bytes
from loramux_engine.lora.errors import UnsupportedAdapterError
from loramux_engine.lora.files import CONFIG_NAME
from loramux_engine.lora.peft_config import ResolvedLoRAConfig, resolve_peft_config
from loramux_engine.lora.shape import BaseModelShape

MAX_CONFIG_BYTES = 64 * 1024
# Keys through which a Hugging Face config can make a loader import or run code.
CODE_KEYS = ("auto_map", "trust_remote_code")


@dataclass(frozen=True, slots=True)
class ConfigSummary:
    config: Mapping[str, Any]
    resolved: ResolvedLoRAConfig
    rank: int  # the largest rank of an adapted module
    alpha: float
    target_modules: list[str]  # the adapted modules' full names, in model order


def _refuse(reason: str) -> AdapterRejected:
    return AdapterRejected(f"{CONFIG_NAME} is refused: {reason}")


def _keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


def _rank(value: Any, max_rank: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_rank:
        raise _refuse(f"{where} is {value!r}; ranks from 1 to {max_rank} are accepted")
    return value


def check_config_bytes(raw: bytes, shape: BaseModelShape, max_rank: int) -> ConfigSummary:
    if len(raw) > MAX_CONFIG_BYTES:
        raise _refuse(f"it is {len(raw)} bytes, over the {MAX_CONFIG_BYTES}-byte limit")
    try:
        config = parse_config_bytes(raw)
    except UnsupportedAdapterError as error:
        raise AdapterRejected(str(error)) from None
    code_keys = sorted(set(_keys(config)) & set(CODE_KEYS))
    if code_keys:
        raise _refuse(f"it names code to run ({code_keys[0]}); adapters may not ship code")
    if config.get("peft_type") != "LORA":
        raise _refuse(f"peft_type must be 'LORA', got {config.get('peft_type')!r}")
    _rank(config.get("r", 8), max_rank, "r")
    rank_pattern = config.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict):
        raise _refuse("rank_pattern must map module patterns to ranks")
    for pattern, value in rank_pattern.items():
        _rank(value, max_rank, f"the rank of {pattern!r}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise _refuse(f"lora_alpha must be a finite number, got {alpha!r}")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets)):
        raise _refuse("target_modules must be a non-empty list of module names or a pattern")
    try:
        resolved = resolve_peft_config(config, shape, max_rank)
    except UnsupportedAdapterError as error:
        raise AdapterRejected(str(error)) from None
    return ConfigSummary(
        config,
        resolved,
        resolved.max_rank,
        resolved.lora_alpha,
        list(resolved.target_module_keys),
    )
