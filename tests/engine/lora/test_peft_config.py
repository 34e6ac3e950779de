"""Parsing PEFT adapters: targets, ranks and scales must be exactly what PEFT uses."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from loramux_engine.lora.adapter import parse_adapter
from loramux_engine.lora.shape import BaseModelShape
from tests.engine.lora.adapters import MAX_RANK, TINY, MakeAdapter, read_files


def peft_targets(model: PeftModel) -> dict[tuple[int, str], tuple[int, float]]:
    """(layer, projection) -> (rank, scaling) as PEFT built its LoRA layers."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            found[(layer, parts[-1])] = (module.r["default"], module.scaling["default"])
    return found


CASES: list[dict[str, Any]] = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": "all-linear", "r": 8, "lora_alpha": 16, "use_rslora": True},
    {"target_modules": r".*\.mlp\.(gate|down)_proj", "r": 2, "lora_alpha": 5},
    {
        "target_modules": ["q_proj", "k_proj", "o_proj", "up_proj"],
        "rank_pattern": {"q_proj": 2, "layers.1.mlp.up_proj": 16},
        "alpha_pattern": {"^model.layers.0.self_attn.k_proj": 3, "o_proj": 1},
        "use_rslora": True,
    },
    {"target_modules": ["down_proj", "v_proj"], "layers_to_transform": [1]},
    {"target_modules": "all-linear", "exclude_modules": ["k_proj"]},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": r".*layers\.1\..*_proj", "exclude_modules": r".*\.(q|down)_proj"},
    {"target_modules": ["self_attn.q_proj"], "rank_pattern": {"layers.0.*q_proj": 1}},
]


@pytest.mark.parametrize("lora", CASES, ids=range(len(CASES)))
def test_parse_matches_peft(make_adapter: MakeAdapter, lora: dict[str, Any]) -> None:
    path, model = make_adapter(**lora)
    adapter = parse_adapter(*read_files(path), TINY, MAX_RANK)

    expected = peft_targets(model)
    assert {key: (w.rank, w.scale) for key, w in adapter.weights.items()} == expected
    for (layer, projection), weights in adapter.weights.items():
        attn = "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        module = model.get_submodule(f"base_model.model.model.layers.{layer}.{attn}.{projection}")
        assert torch.equal(weights.a, module.lora_A["default"].weight)
        assert torch.equal(weights.b, module.lora_B["default"].weight)
    assert adapter.num_bytes == sum(
        (w.a.numel() + w.b.numel()) * w.a.element_size() for w in adapter.weights.values()
    )


def test_config_dict_and_summary(make_adapter: MakeAdapter) -> None:
    path, _ = make_adapter(r=8, lora_alpha=4, target_modules=["q_proj", "gate_proj"])
    config_bytes, weights = read_files(path)
    adapter = parse_adapter(json.loads(config_bytes), weights, TINY, MAX_RANK)
    assert adapter.config.target_projections == ("gate_proj", "q_proj")
    assert adapter.config.max_rank == 8
    assert all(w.scale == 0.5 for w in adapter.weights.values())


def test_shape_from_hf_config() -> None:
    config = {
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
    }
    shape = BaseModelShape.from_hf_config(config)
    assert shape.head_dim == 64
    assert shape.features("k_proj") == (576, 192)
    assert shape.features("down_proj") == (1536, 576)
