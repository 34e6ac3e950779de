"""Every adapter the engine cannot apply is refused, with a reason, before it reaches a pool."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch
from safetensors.torch import load, save

from loramux_engine.lora.adapter import parse_adapter
from loramux_engine.lora.errors import UnsupportedAdapterError
from tests.engine.lora.adapters import MAX_RANK, TINY, MakeAdapter, read_files

Tensors = dict[str, torch.Tensor]


@pytest.mark.parametrize(
    ("lora", "reason"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "lora_only"}, "bias"),
        ({"lora_bias": True}, "lora_bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["embed_tokens", "q_proj"]}, "embeddings or lm_head"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ],
)
def test_peft_features_refused(
    make_adapter: MakeAdapter, lora: dict[str, Any], reason: str
) -> None:
    path, _ = make_adapter(**lora)
    with pytest.raises(UnsupportedAdapterError, match=reason):
        parse_adapter(*read_files(path), TINY, MAX_RANK)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"peft_type": "LOHA"}, "peft_type"),
        ({"auto_map": {"base_model_class": "X"}}, "auto_map"),
        ({"target_modules": ["q_proj", "c_attn"]}, r"\['c_attn'\] are not modules"),
        ({"target_modules": ["lm_head"]}, "embeddings or lm_head"),
        ({"target_modules": ".*"}, "LoRA on model is not supported"),
        ({"target_modules": None}, "target_modules is missing"),
        (
            {"target_modules": ".*q_proj", "layers_to_transform": [0]},
            "need target_modules as a list",
        ),
        ({"init_lora_weights": "pissa"}, "changes the base model's weights"),
        ({"r": 0}, "rank"),
        ({"r": 4.0}, "rank"),
        ({"lora_alpha": "8"}, "lora_alpha"),
        ({"rank_pattern": {"q_proj": MAX_RANK + 1}}, "rank of model.layers.0.self_attn.q_proj"),
        ({"alpha_pattern": {"(": 2}}, "not a valid regular expression"),
        ({"use_rslora": "yes"}, "use_rslora"),
    ],
)
def test_config_refused(make_adapter: MakeAdapter, edit: dict[str, Any], reason: str) -> None:
    path, _ = make_adapter(r=4)
    config_bytes, weights = read_files(path)
    config = json.loads(config_bytes) | edit
    with pytest.raises(UnsupportedAdapterError, match=reason):
        parse_adapter(json.dumps(config).encode(), weights, TINY, MAX_RANK)


def test_rank_over_max_refused(make_adapter: MakeAdapter) -> None:
    path, _ = make_adapter(r=8)
    with pytest.raises(UnsupportedAdapterError, match="rank from 1 to 4"):
        parse_adapter(*read_files(path), TINY, max_rank=4)


def test_other_base_model_refused(make_adapter: MakeAdapter) -> None:
    path, _ = make_adapter(target_modules=["down_proj"])
    wider = replace(TINY, intermediate_size=64)
    with pytest.raises(UnsupportedAdapterError, match=r"has shape \[4, 48\].*need \[4, 64\]"):
        parse_adapter(*read_files(path), wider, MAX_RANK)


def test_not_json_refused() -> None:
    with pytest.raises(UnsupportedAdapterError, match="not valid JSON"):
        parse_adapter(b"{nope", b"", TINY, MAX_RANK)
    with pytest.raises(UnsupportedAdapterError, match="not an object"):
        parse_adapter(b"[]", b"", TINY, MAX_RANK)


def _first(tensors: Tensors) -> str:
    return sorted(tensors)[0]


def _drop(tensors: Tensors) -> Tensors:
    return {k: v for k, v in tensors.items() if k != _first(tensors)}


def _extra(tensors: Tensors) -> Tensors:
    return tensors | {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)}


def _poison(value: float) -> Callable[[Tensors], Tensors]:
    def poison(tensors: Tensors) -> Tensors:
        bad = tensors[_first(tensors)].clone()
        bad[0, 0] = value
        return tensors | {_first(tensors): bad}

    return poison


def _as_int(tensors: Tensors) -> Tensors:
    return tensors | {_first(tensors): tensors[_first(tensors)].to(torch.int32)}


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_drop, "1 tensors the config implies are missing"),
        (_extra, "1 tensors are not LoRA weights"),
        (_poison(math.nan), "NaN or infinite"),
        (_poison(math.inf), "NaN or infinite"),
        (_as_int, "dtype 'I32'"),
    ],
)
def test_weights_refused(
    make_adapter: MakeAdapter, edit: Callable[[Tensors], Tensors], reason: str
) -> None:
    path, _ = make_adapter(target_modules=["q_proj", "v_proj"])
    config_bytes, weights = read_files(path)
    bad = save(edit(load(weights)), {"format": "pt"})
    with pytest.raises(UnsupportedAdapterError, match=reason):
        parse_adapter(config_bytes, bad, TINY, MAX_RANK)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None])
def test_every_float_dtype_is_checked_for_nan_and_inf(
    make_adapter: MakeAdapter, dtype: torch.dtype, value: float | None
) -> None:
    path, _ = make_adapter(target_modules=["q_proj", "v_proj"])
    config_bytes, weights = read_files(path)
    tensors = {name: t.to(dtype) for name, t in load(weights).items()}
    last = sorted(tensors)[-1]
    bad = tensors[last].clone()
    # an ordinary value passes; NaN and either infinity are refused (huge finite values
    # are refused too: see test_hostile_values.py)
    bad[-1, -1] = -1.5 if value is None else value
    weights = save(tensors | {last: bad}, {"format": "pt"})
    if value is None:
        adapter = parse_adapter(config_bytes, weights, TINY, MAX_RANK)
        assert any(w.b.dtype == dtype for w in adapter.weights.values())
        return
    with pytest.raises(UnsupportedAdapterError, match=f"{last!r} contains NaN or infinite"):
        parse_adapter(config_bytes, weights, TINY, MAX_RANK)


@pytest.mark.parametrize(
    ("cut", "reason"),
    [(lambda w: w[:5], "only 5 bytes"), (lambda w: w[:-4], "outside the file's")],
)
def test_corrupt_safetensors_refused(
    make_adapter: MakeAdapter, cut: Callable[[bytes], bytes], reason: str
) -> None:
    path, _ = make_adapter(target_modules=["q_proj"])
    config_bytes, weights = read_files(path)
    with pytest.raises(UnsupportedAdapterError, match=reason):
        parse_adapter(config_bytes, cut(weights), TINY, MAX_RANK)
