"""The CPU decode-attention kernel against SDPA, over the shapes the engine can hand it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loramux_engine.kernels import decode_attention as kernel

SHAPES = [  # (heads, kv_heads, head_dim): SmolLM2, MHA, Llama-3-like, the generic path
    (9, 3, 64),
    (4, 4, 64),
    (32, 8, 128),
    (6, 2, 32),
    (16, 1, 48),
]


def reference(q, k_cache, v_cache, starts, lens, scale):
    out = torch.empty_like(q)
    for b, (start, n) in enumerate(zip(starts, lens, strict=True)):
        qs = q[b : b + 1].transpose(0, 1).unsqueeze(0)
        ks = k_cache[:, start : start + n].unsqueeze(0)
        vs = v_cache[:, start : start + n].unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True)
        out[b] = o.squeeze(0).transpose(0, 1)
    return out


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), SHAPES)
def test_kernel_matches_sdpa(heads: int, kv_heads: int, head_dim: int) -> None:
    if not kernel.supports(heads, kv_heads, head_dim):
        assert head_dim % 16  # the one shape here the kernel leaves to SDPA
        return
    library = kernel.load()
    if library is None:
        pytest.skip("no C compiler")
    rng = random.Random(heads * head_dim)
    lens = [1, 2, 15, 16, 17, 31, 33, 300] + [rng.randint(1, 200) for _ in range(8)]
    starts, row = [], 0
    for n in lens:
        starts.append(row)
        row += n + rng.randint(0, 9)  # gaps between sequences, as the cache manager leaves
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(kv_heads, row, head_dim, generator=gen) * 3  # peaky softmaxes
    v_cache = torch.randn(kv_heads, row, head_dim, generator=gen)
    q = torch.randn(len(lens), heads, head_dim, generator=gen)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    kernel.decode_attention(
        library, q, k_cache, v_cache, torch.tensor(starts), torch.tensor(lens), scale, out
    )
    torch.testing.assert_close(
        out, reference(q, k_cache, v_cache, starts, lens, scale), rtol=1e-5, atol=2e-6
    )


def test_kernel_refuses_what_it_does_not_support() -> None:
    assert not kernel.supports(9, 3, 72)
    assert not kernel.supports(8, 3, 64)
    assert not kernel.supports(34, 2, 64)  # 17 query heads per kv head
    assert kernel.supports(32, 8, 128)


def test_kernel_shares_torchs_openmp_runtime() -> None:
    """One libgomp in the process: the kernel's threads are torch's, not a second pool."""
    if kernel.load() is None:
        pytest.skip("no C compiler")
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps here")
    loaded = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
    assert len(loaded) <= 1, loaded
