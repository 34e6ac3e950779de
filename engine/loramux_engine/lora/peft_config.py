"""Resolve a PEFT LoRA ``adapter_config.json`` against a LLaMA-family base model.

Target matching, ``rank_pattern``/``alpha_pattern`` lookup and scaling follow PEFT
(peft.tuners.tuners_utils.check_target_module_exists, peft.utils.other.get_pattern_key,
LoraLayer.update_layer) so that an adapter means here exactly what it means in PEFT.
Everything we cannot apply is refused with an :class:`UnsupportedAdapterError`.

Patterns are tenant text and never reach ``re``: each is matched once against the base
model's finite list of module names by the bounded matcher in :mod:`.patterns`, which gives
``re``'s answer in work capped per config (the same count at upload, in validation and in
the engine's loader, so all three reach the same result). ``layers_pattern`` must be a plain
module name (``layers``, ``h``, ``blocks``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from loramux_engine.lora.errors import UnsupportedAdapterError
from loramux_engine.lora.patterns import Budget, ModuleNames, fullmatch_pattern, suffix_pattern
from loramux_engine.lora.shape import PROJECTIONS, BaseModelShape, module_key

# rank_pattern and alpha_pattern keys each (PEFT writes one per module at most, and a
# 64 KiB config holds fewer anyway); the work budget bounds what they cost together.
MAX_PATTERN_KEYS = 1024

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

    @property
    def target_module_keys(self) -> tuple[str, ...]:
        """The adapted modules' full names, in model order, as PEFT's targeted_module_names."""
        order = sorted(self.targets, key=lambda target: (target[0], PROJECTIONS.index(target[1])))
        return tuple(module_key(layer, projection) for layer, projection in order)


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


class _PatternLookup:
    """PEFT's get_pattern_key over ``rank_pattern`` or ``alpha_pattern``: the first key, in
    the config's order, that matches a dotted suffix of the module."""

    def __init__(self, value: Any, name: str) -> None:
        if value is None:
            value = {}
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise _refuse(f"{name} must map module name patterns to values")
        if len(value) > MAX_PATTERN_KEYS:
            raise _refuse(f"{name} has {len(value)} keys, over the limit of {MAX_PATTERN_KEYS}")
        self.values: dict[str, Any] = value
        self.name = name

    def resolve(self, names: ModuleNames, budget: Budget) -> dict[str, str]:
        """Module -> the key PEFT's get_pattern_key picks for it, for the modules a key matches."""
        patterns = [suffix_pattern(key, f"{self.name} key", budget) for key in self.values]
        keys: dict[str, str] = {}
        remaining = set(names.names)
        for key, pattern in zip(self.values, patterns, strict=True):
            if not remaining:
                break
            for module in pattern.matching(names, budget) & remaining:
                keys[module] = key
                remaining.discard(module)
        return keys


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


def _layers_pattern(value: Any) -> list[str]:
    """PEFT accepts a regular expression here; we take plain names, the ones models use."""
    if not value:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(
        isinstance(name, str) and name.isascii() and name.isidentifier() for name in names
    ):
        raise _refuse(
            "layers_pattern must name the model's list of layers (for example 'layers'), "
            "or be a list of such names; regular expressions are not accepted"
        )
    return names


def _layer_index(key: str, layers_pattern: list[str]) -> int | None:
    """PEFT's layer index of a module key, without a regular expression.

    Without a layers_pattern PEFT takes ``re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)``:
    the first dotted part after the first one that is followed by a part of decimal digits
    and then a dot. With plain names, ``re.match(rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\.", key)``
    is the first part equal to the name followed the same way; names are tried in order.
    """
    parts = key.split(".")
    # Part i is followed by digits (part i + 1) and then a dot (so a part i + 2 exists).
    indexed = [i for i in range(len(parts) - 2) if parts[i + 1].isdecimal()]
    if not layers_pattern:
        found = next((i for i in indexed if i >= 1), None)
    else:
        found = next((i for name in layers_pattern for i in indexed if parts[i] == name), None)
    return None if found is None else int(parts[found + 1])


@lru_cache(maxsize=8)
def _module_names(shape: BaseModelShape) -> tuple[frozenset[str], ModuleNames]:
    """Every dotted suffix of a module name PEFT's matching sees on this model (what a
    target_modules list may name), and those names for patterns."""
    keys = [key for _, _, key in shape.projection_keys()] + list(shape.other_module_keys())
    return frozenset(suffix for key in keys for suffix in _dotted_suffixes(key)), ModuleNames(keys)


class _TargetMatcher:
    """PEFT's check_target_module_exists for one config, over the base model's modules."""

    def __init__(self, config: Mapping[str, Any], shape: BaseModelShape, budget: Budget) -> None:
        targets = _names(config.get("target_modules"), "target_modules")
        if targets is None:
            raise _refuse("target_modules is missing; list the projections the adapter adapts")
        if isinstance(targets, str) and targets.lower() == "all-linear":
            targets = [key for _, _, key in shape.projection_keys()]
        self.layers = config.get("layers_to_transform")
        self.layers_pattern = _layers_pattern(config.get("layers_pattern"))
        if isinstance(targets, str) and (self.layers is not None or self.layers_pattern):
            raise _refuse("layers_to_transform and layers_pattern need target_modules as a list")
        if self.layers is not None and not (
            isinstance(self.layers, int)
            or (isinstance(self.layers, list) and all(isinstance(i, int) for i in self.layers))
        ):
            raise _refuse("layers_to_transform must be a layer index or a list of them")
        exclude = _names(config.get("exclude_modules"), "exclude_modules")
        _, names = _module_names(shape)
        # A string is a pattern, matched once here against every module of the model.
        self.targets: set[str] = (
            fullmatch_pattern(targets, "target_modules", budget).matching(names, budget)
            if isinstance(targets, str)
            else set(targets)
        )
        self.targets_pattern = isinstance(targets, str)
        self.excluded: set[str] = (
            fullmatch_pattern(exclude, "exclude_modules", budget).matching(names, budget)
            if isinstance(exclude, str)
            else set()
        )
        self.exclude_names: set[str] = set(exclude) if isinstance(exclude, list) else set()

    def __call__(self, key: str) -> bool:
        if key in self.excluded or (self.exclude_names and _matches_list(self.exclude_names, key)):
            return False
        if self.targets_pattern:
            return key in self.targets
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
    rank_pattern = _PatternLookup(config.get("rank_pattern"), "rank_pattern")
    alpha_pattern = _PatternLookup(config.get("alpha_pattern"), "alpha_pattern")
    budget = Budget()
    matcher = _TargetMatcher(config, shape, budget)

    for key in shape.other_module_keys():
        if matcher(key):
            what = "embeddings or lm_head" if key.endswith(("embed_tokens", "lm_head")) else key
            raise _refuse(f"LoRA on {what} is not supported; target linear projections only")
    if not matcher.targets_pattern:
        known, _ = _module_names(shape)
        unknown = matcher.targets - known
        if unknown:
            raise _refuse(
                f"target_modules {sorted(unknown)} are not modules of a LLaMA-family model"
            )

    adapted = [target for target in shape.projection_keys() if matcher(target[2])]
    if not adapted:
        raise _refuse("target_modules match none of the base model's projections")
    modules = ModuleNames(key for _, _, key in adapted)
    rank_keys = rank_pattern.resolve(modules, budget)
    alpha_keys = alpha_pattern.resolve(modules, budget)
    targets: dict[tuple[int, str], ProjectionTarget] = {}
    for layer, projection, key in adapted:
        # PEFT looks the module's own name up when no key matches it.
        rank = _check_rank(
            rank_pattern.values.get(rank_keys.get(key, key), r), max_rank, f"rank of {key}"
        )
        alpha = _check_alpha(
            alpha_pattern.values.get(alpha_keys.get(key, key), lora_alpha), f"alpha of {key}"
        )
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        targets[(layer, projection)] = ProjectionTarget(rank=rank, scale=scale)
    return ResolvedLoRAConfig(targets=targets, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora)
