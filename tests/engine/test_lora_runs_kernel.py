"""The CPU multi-LoRA runs kernel against the op's defining formula, on odd shapes."""

from __future__ import annotations

import pytest
import torch

from loramux_engine.kernels import lora_runs as kernel


@pytest.mark.parametrize(("in_features", "out_features"), [(48, 80), (576, 192), (32, 1536)])
def test_runs_kernel_matches_formula(in_features: int, out_features: int) -> None:
    library = kernel.load()
    if library is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(in_features)
    num_slots, max_rank = 5, 24
    a = torch.randn(num_slots, max_rank, in_features, generator=gen)
    b_t = torch.randn(num_slots, max_rank, out_features, generator=gen)
    scale = torch.tensor([0.0, 0.5, 2.0, 1.0, 0.25])
    ranks = torch.tensor([0, 24, 1, 0, 7])  # slot 3 does not adapt this projection
    lengths = [1, 5, 9, 4, 3, 2, 13]
    runs, start = [], 0
    for i, n in enumerate(lengths):
        runs.append((1 + i % 4, start, start + n))
        start += n + 1  # a base-model token between runs: left alone
    x = torch.randn(start, in_features, generator=gen)
    y = torch.randn(start, out_features, generator=gen)
    expected = y.clone()
    for slot, lo, hi in runs:
        r = int(ranks[slot])
        expected[lo:hi] += scale[slot] * (x[lo:hi] @ a[slot, :r].T) @ b_t[slot, :r]
    assert kernel.supports(x, y, a, b_t)
    kernel.lora_runs(library, y, x, a, b_t, scale, ranks, torch.tensor(runs))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


def test_runs_kernel_refuses_other_layouts() -> None:
    a, b_t = torch.zeros(2, 4, 48), torch.zeros(2, 4, 80)
    assert not kernel.supports(torch.zeros(3, 40), torch.zeros(3, 80), a, b_t)
    assert not kernel.supports(torch.zeros(3, 48).T.contiguous().T, torch.zeros(3, 80), a, b_t)
    assert not kernel.supports(torch.zeros(3, 48, dtype=torch.float64), torch.zeros(3, 80), a, b_t)
