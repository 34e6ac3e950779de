"""Resolve a PEFT LoRA ``adapter_config.json`` against a LLaMA-family base model.

Target matching, ``rank_pattern``/``alpha_pattern`` lookup and scaling follow PEFT
(peft.tuners.tuners_utils.check_target_module_exists, peft.utils.other.get_pattern_key,
LoraLayer.update_layer) so that an adapter means here exactly what it means in PEFT.
Everything we cannot apply is refused with an :class:`UnsupportedAdapterError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loramux_engine.lora.errors import UnsupportedAdapterError
from loramux_engine.lora.shape import BaseModelShape

# init_lora_weights values that only change how training started; the others (pissa,
# olora, corda, loftq, lora_ga, mica) rewrite the base weights or change the forward.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_VARIANTS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a trained LoRA bias (lora_bias)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "parameter targeting (target_parameters)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
}


@dataclass(frozen=True, slots=True)
class ProjectionTarget:
    rank: int
    scale: float


@dataclass(frozen=True, slots=True)
class ResolvedLoRAConfig:
    """Which projections an adapter adapts, each with its PEFT rank and scaling."""

    targets: dict[tuple[int, str], ProjectionTarget]
    r: int
    lora_alpha: float
    use_rslora: bool

    @property
    def max_rank(self) -> int:
        return max(target.rank for target in self.targets.values())

    @property
    def target_projections(self) -> tuple[str, ...]:
        return tuple(sorted({projection for _, projection in self.targets}))


def _refuse(reason: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(f"unsupported adapter: {reason}")


def _check_rank(value: Any, max_rank: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_rank:
        raise _refuse(f"{where} must be an integer rank from 1 to {max_rank}, got {value!r}")
    return value


def _check_alpha(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _refuse(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _check_patterns(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise _refuse(f"{name} must map module name patterns to values")
    for key in value:
        try:
            re.compile(key)
        except re.error as error:
            raise _refuse(f"{name} key {key!r} is not a valid regular expression") from error
    return value


def pattern_key(pattern_keys: Sequence[str], module: str) -> str:
    """PEFT's get_pattern_key: the first pattern matching a dotted suffix of the module."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _names(value: Any, name: str) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise _refuse(f"{name} must be a list of module names or a regular expression")


def _dotted_suffixes(key: str) -> list[str]:
    """The key and each tail after one of its dots: ``a.b.c`` -> ``a.b.c``, ``b.c``, ``c``."""
    parts = key.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _matches_list(names: set[str], key: str) -> bool:
    # PEFT: `key in names or any(key.endswith("." + name) for name in names)`, via a set.
    return any(suffix in names for suffix in _dotted_suffixes(key))


def _layer_index(key: str, layers_pattern: Any) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


class _TargetMatcher:
    """PEFT's check_target_module_exists for one config."""

    def __init__(self, config: Mapping[str, Any], shape: BaseModelShape) -> None:
        targets = _names(config.get("target_modules"), "target_modules")
        if targets is None:
            raise _refuse("target_modules is missing; list the projections the adapter adapts")
        if isinstance(targets, str) and targets.lower() == "all-linear":
            targets = [key for _, _, key in shape.projection_keys()]
        self.targets: str | set[str] = targets if isinstance(targets, str) else set(targets)
        exclude = _names(config.get("exclude_modules"), "exclude_modules")
        self.exclude: str | set[str] = exclude if isinstance(exclude, str) else set(exclude or ())
        self.layers = config.get("layers_to_transform")
        self.layers_pattern = config.get("layers_pattern")
        if isinstance(targets, str) and (self.layers is not None or self.layers_pattern):
            raise _refuse("layers_to_transform and layers_pattern need target_modules as a list")
        if self.layers is not None and not (
            isinstance(self.layers, int)
            or (isinstance(self.layers, list) and all(isinstance(i, int) for i in self.layers))
        ):
            raise _refuse("layers_to_transform must be a layer index or a list of them")

    def __call__(self, key: str) -> bool:
        if isinstance(self.exclude, str):
            if re.fullmatch(self.exclude, key):
                return False
        elif self.exclude and _matches_list(self.exclude, key):
            return False
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, key) is not None
        if key in self.targets:
            return True
        found = _matches_list(self.targets, key)
        if found and self.layers is not None and self.layers != []:
            index = _layer_index(key, self.layers_pattern)
            if index is None:
                return False
            return index == self.layers if isinstance(self.layers, int) else index in self.layers
        return found


def _check_features(config: Mapping[str, Any]) -> None:
    if config.get("peft_type") != "LORA":
        raise _refuse(f"peft_type must be 'LORA', got {config.get('peft_type')!r}")
    if config.get("auto_map"):
        raise _refuse("adapters that ship code (auto_map) are not accepted")
    for key, feature in _VARIANTS.items():
        if config.get(key):
            raise _refuse(f"{feature} is not supported; only plain LoRA on linear projections is")
    if config.get("bias", "none") != "none":
        raise _refuse(f"trained biases (bias={config.get('bias')!r}) are not supported; use 'none'")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise _refuse(
            f"init_lora_weights={init!r} changes the base model's weights; convert the adapter "
            "to plain LoRA (PEFT's path_initial_model_for_weight_conversion) before uploading"
        )


def resolve_peft_config(
    config: Mapping[str, Any], shape: BaseModelShape, max_rank: int
) -> ResolvedLoRAConfig:
    """Check a parsed adapter_config.json and resolve each adapted projection's rank and scale."""
    if not isinstance(config, Mapping):
        raise _refuse("adapter_config.json must hold a JSON object")
    _check_features(config)
    r = _check_rank(config.get("r", 8), max_rank, "r")
    lora_alpha = _check_alpha(config.get("lora_alpha", 8), "lora_alpha")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _refuse("use_rslora must be true or false")
    rank_pattern = _check_patterns(config.get("rank_pattern"), "rank_pattern")
    alpha_pattern = _check_patterns(config.get("alpha_pattern"), "alpha_pattern")
    matcher = _TargetMatcher(config, shape)

    for key in shape.other_module_keys():
        if matcher(key):
            what = "embeddings or lm_head" if key.endswith(("embed_tokens", "lm_head")) else key
            raise _refuse(f"LoRA on {what} is not supported; target linear projections only")
    if isinstance(matcher.targets, set):
        known = [key for _, _, key in shape.projection_keys()] + list(shape.other_module_keys())
        unknown = matcher.targets.difference(*(_dotted_suffixes(key) for key in known))
        if unknown:
            raise _refuse(
                f"target_modules {sorted(unknown)} are not modules of a LLaMA-family model"
            )

    targets: dict[tuple[int, str], ProjectionTarget] = {}
    for layer, projection, key in shape.projection_keys():
        if not matcher(key):
            continue
        rank = _check_rank(
            rank_pattern.get(pattern_key(list(rank_pattern), key), r), max_rank, f"rank of {key}"
        )
        alpha = _check_alpha(
            alpha_pattern.get(pattern_key(list(alpha_pattern), key), lora_alpha), f"alpha of {key}"
        )
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        targets[(layer, projection)] = ProjectionTarget(rank=rank, scale=scale)
    if not targets:
        raise _refuse("target_modules match none of the base model's projections")
    return ResolvedLoRAConfig(targets=targets, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora)
