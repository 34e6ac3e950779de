"""Adapters with huge finite values are refused before any weight reaches a slot pool.

A value finite in the file can overflow once cast to the pool's dtype or multiplied by
the scale; lora/values.py bounds every weight, every scale and each projection's update,
so that what passes stays finite in every serving dtype.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
import torch
from safetensors.torch import load, save

from loramux_engine.lora.adapter import parse_adapter
from loramux_engine.lora.errors import UnsupportedAdapterError
from loramux_engine.lora.ops import LoRABatch, add_lora
from loramux_engine.lora.pool import LoRASlotPool
from loramux_engine.lora.values import (
    MAX_LORA_DELTA,
    MAX_LORA_SCALE,
    MAX_LORA_WEIGHT,
    tensor_absmax,
)
from tests.engine.lora.adapters import MAX_RANK, TINY, MakeAdapter, read_files

Tensors = dict[str, torch.Tensor]
SERVING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _config(config: bytes, **changes: Any) -> bytes:
    return json.dumps(json.loads(config) | changes).encode()


def _weights(weights: bytes, dtype: torch.dtype | None = None, **values: float) -> bytes:
    """The weights in `dtype`, with [0, 0] of Q_A / Q_B set to the values given as a= / b=."""
    tensors = {n: t if dtype is None else t.to(dtype) for n, t in load(weights).items()}
    for which, value in values.items():
        name = {"a": Q_A, "b": Q_B}[which]
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] = value
    return save(tensors, {"format": "pt"})


@pytest.fixture
def files(make_adapter: MakeAdapter) -> tuple[bytes, bytes]:
    """A rank-4 adapter of q_proj and v_proj with lora_alpha 8 (scale 2)."""
    path, _ = make_adapter(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return read_files(path)


def _refused(config: bytes, weights: bytes, match: str) -> None:
    with pytest.raises(UnsupportedAdapterError, match=match):
        parse_adapter(config, weights, TINY, MAX_RANK)


@pytest.mark.parametrize("alpha", [1e300, -1e300, 4 * MAX_LORA_SCALE + 4])
def test_huge_lora_alpha_is_refused(files: tuple[bytes, bytes], alpha: float) -> None:
    config, weights = files
    _refused(
        _config(config, lora_alpha=alpha),
        weights,
        r"LoRA scale of model\.layers\.0\.self_attn\.q_proj \(lora_alpha / r.*outside \+-1024",
    )


def test_huge_scale_through_patterns_or_rslora_is_refused(
    files: tuple[bytes, bytes], make_adapter: MakeAdapter
) -> None:
    config, weights = files
    _refused(
        _config(config, alpha_pattern={"v_proj": 1e6}),
        weights,
        r"LoRA scale of model\.layers\.0\.self_attn\.v_proj .* is 2\.5e\+05",
    )
    _refused(
        _config(config, use_rslora=True, lora_alpha=2100),  # 2100 / sqrt(4) = 1050
        weights,
        r"q_proj \(lora_alpha / sqrt\(r\).* is 1\.05e\+03",
    )
    path, _ = make_adapter(
        r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 1}, alpha_pattern={"q_proj": 2e3}
    )
    _refused(*read_files(path), r"LoRA scale of model\.layers\.0\.self_attn\.q_proj .* 2e\+03")


@pytest.mark.parametrize(
    ("dtype", "value", "shown"),
    [
        (torch.float32, 1e18, "1e+18"),
        (torch.float64, 1e300, "1e+300"),
        (torch.float64, -1e300, "1e+300"),
        (torch.float32, MAX_LORA_WEIGHT + 1, "4.1e+03"),
        # The largest finite value of every file dtype: finite, and far too large.
        (torch.float16, torch.finfo(torch.float16).max, "6.55e+04"),
        (torch.bfloat16, torch.finfo(torch.bfloat16).max, "3.39e+38"),
        (torch.float32, torch.finfo(torch.float32).max, "3.4e+38"),
        (torch.float64, torch.finfo(torch.float64).max, "1.8e+308"),
    ],
)
def test_huge_finite_weights_are_refused(
    files: tuple[bytes, bytes], dtype: torch.dtype, value: float, shown: str
) -> None:
    config, weights = files
    _refused(
        config,
        _weights(weights, dtype, b=value),
        re.escape(f"{Q_B!r} holds a weight of magnitude {shown}, over the bound 4096"),
    )


def test_large_product_of_bounded_values_is_refused(files: tuple[bytes, bytes]) -> None:
    config, weights = files
    # Each weight is within its bound; 2 x 4 x 100 x 100 = 80,000 is over the update bound.
    _refused(
        config,
        _weights(weights, a=100.0, b=100.0),
        r"update of model\.layers\.0\.self_attn\.q_proj is too large: scale 2 x rank 4 x "
        r"max\|A\| 100 x max\|B\| 100 = 8e\+04, over the bound 4096",
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_edge_values_that_are_harmless_pass(files: tuple[bytes, bytes], dtype: torch.dtype) -> None:
    config, weights = files
    tiny = torch.tensor(1, dtype={2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize])
    smallest_subnormal = float(tiny.view(dtype))
    for edit in ({"a": smallest_subnormal}, {"b": -0.0}, {"a": -smallest_subnormal}):
        adapter = parse_adapter(config, _weights(weights, dtype, **edit), TINY, MAX_RANK)
        assert adapter.weights[(0, "q_proj")].a.dtype == dtype


def test_weights_at_the_bounds_pass(files: tuple[bytes, bytes]) -> None:
    config, weights = files
    tensors = load(weights)
    tensors[Q_B] = torch.full_like(tensors[Q_B], 0.01)
    tensors[Q_A] = tensors[Q_A].clone()
    tensors[Q_A][0, 0] = -MAX_LORA_WEIGHT  # 2 x 4 x 4096 x 0.01 = 328: within the update bound
    adapter = parse_adapter(config, save(tensors), TINY, MAX_RANK)
    assert adapter.weights[(0, "q_proj")].a.abs().max() == MAX_LORA_WEIGHT


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([-3.5, 2.0, 0.0], 3.5),
        ([-0.0, 0.0], 0.0),
        ([1.0, -4096.0], 4096.0),
        ([], 0.0),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_tensor_absmax_reads_every_dtype(
    dtype: torch.dtype, values: list[float], expected: float
) -> None:
    assert tensor_absmax("w", torch.tensor(values, dtype=dtype)) == expected
    if values:  # a strided view reads the same
        wide = torch.tensor([values, values], dtype=dtype).T
        assert tensor_absmax("w", wide) == expected


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_tensor_absmax_refuses_nan_and_inf(dtype: torch.dtype, value: float) -> None:
    with pytest.raises(UnsupportedAdapterError, match="'w' contains NaN or infinite values"):
        tensor_absmax("w", torch.tensor([1.0, value, 2.0], dtype=dtype))


def test_tensor_absmax_refuses_non_float() -> None:
    with pytest.raises(UnsupportedAdapterError, match="not a float dtype"):
        tensor_absmax("w", torch.tensor([1, 2], dtype=torch.int32))


def _adapter_at_the_bounds(files: tuple[bytes, bytes]) -> Any:
    """Scale 1024 with a weight of 4096: every bound reached at once on q_proj."""
    config, weights = files
    tensors = load(weights)
    tensors[Q_A] = tensors[Q_A].clone()
    tensors[Q_A][0, 0] = MAX_LORA_WEIGHT
    # 1024 x 4 x 4096 x max|B| <= 4096 needs max|B| <= 2**-12.
    tensors[Q_B] = torch.full_like(tensors[Q_B], 2.0**-12)
    config = _config(config, lora_alpha=4 * MAX_LORA_SCALE)
    for name in tensors:
        if name not in (Q_A, Q_B):
            tensors[name] = tensors[name] * 0.01  # their updates within the bound at 1024
    return parse_adapter(config, save(tensors), TINY, MAX_RANK)


@pytest.mark.parametrize("dtype", SERVING_DTYPES)
def test_an_adapter_at_the_bounds_is_finite_in_every_serving_dtype(
    files: tuple[bytes, bytes], dtype: torch.dtype
) -> None:
    finfo = torch.finfo(dtype)
    assert max(MAX_LORA_WEIGHT, MAX_LORA_SCALE, MAX_LORA_DELTA) < finfo.max
    adapter = _adapter_at_the_bounds(files)
    pool = LoRASlotPool(TINY, num_slots=2, max_rank=MAX_RANK, dtype=dtype)
    pool.load(1, adapter)
    for stack in pool.stacks.values():
        for tensor in (stack.a, stack.b_t, stack.scale):
            assert bool(torch.isfinite(tensor).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_adapter_at_the_bounds_leaves_other_slots_tokens_alone(
    files: tuple[bytes, bytes], make_adapter: MakeAdapter, dtype: torch.dtype
) -> None:
    """The bmm kernel runs every slot in its range over pad rows of other slots' tokens."""
    victim_path, _ = make_adapter(seed=3, r=4, target_modules=["q_proj"])
    victim = parse_adapter(*read_files(victim_path), TINY, MAX_RANK)
    pool = LoRASlotPool(TINY, num_slots=4, max_rank=MAX_RANK, dtype=dtype)
    pool.load(1, victim)
    pool.load(3, victim)
    torch.manual_seed(0)
    x = torch.randn(4, TINY.hidden_size, dtype=dtype)
    base = torch.randn(4, TINY.num_heads * TINY.head_dim, dtype=dtype)
    batch = LoRABatch.build([1, 1, 3, 3], "cpu", kernel="bmm", dtype=dtype)
    assert batch.groups is not None and batch.groups.num_slots == 3  # slot 2 is padded

    def run() -> torch.Tensor:
        y = base.clone()
        add_lora(y, x, pool.stack(0, "q_proj"), batch)
        return y

    alone = run()
    pool.load(2, _adapter_at_the_bounds(files))
    beside = run()
    assert bool(torch.isfinite(beside).all())
    assert torch.equal(beside, alone)
