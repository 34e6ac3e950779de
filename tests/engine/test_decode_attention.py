"""The CPU decode-attention kernel against SDPA, over the shapes the engine can hand it.

Each check runs on the library as built for this machine and on a build forced to
16-float vectors (ATTENTION_WIDTH=16: the AVX-512 build's blocking, which an AVX2 host
otherwise never runs)."""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loramux_engine.kernels import decode_attention as kernel

KERNELS = Path(kernel.__file__).parent

SHAPES = [  # (heads, kv_heads, head_dim): SmolLM2, MHA, Llama-3-like, the generic path
    (9, 3, 64),
    (4, 4, 64),
    (32, 8, 128),
    (6, 2, 32),
    (16, 1, 48),
]


def rows_of(table: list[int], block_size: int, n: int) -> torch.Tensor:
    """The cache rows of a sequence's first n keys, through its block table."""
    return torch.tensor([table[i // block_size] * block_size + i % block_size for i in range(n)])


def reference(q, k_cache, v_cache, tables, lens, block_size, scale):
    out = torch.empty_like(q)
    for b, (table, n) in enumerate(zip(tables, lens, strict=True)):
        rows = rows_of(table, block_size, n)
        qs = q[b : b + 1].transpose(0, 1).unsqueeze(0)
        ks = k_cache[:, rows].unsqueeze(0)
        vs = v_cache[:, rows].unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True)
        out[b] = o.squeeze(0).transpose(0, 1)
    return out


def _wide(tmp: Path) -> ctypes.CDLL | None:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return None
    target = tmp / "decode_attention_wide.so"
    flags = ["-O2", "-march=native", "-shared", "-fPIC", "-fopenmp", "-DATTENTION_WIDTH=16"]
    subprocess.run(
        [compiler, *flags, str(KERNELS / "decode_attention.c"), "-o", str(target), "-lm"],
        check=True,
        capture_output=True,
    )
    library = ctypes.CDLL(str(target))
    kernel._declare(library)
    return library


@pytest.fixture(scope="module", params=["native", "wide"])
def library(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> ctypes.CDLL:
    built = kernel.load() if request.param == "native" else _wide(tmp_path_factory.mktemp("w"))
    if built is None:
        pytest.skip("no C compiler here")
    return built


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(library, q, k_cache, v_cache, tables, lens, block_size, scale):
    out = torch.full_like(q, float("nan"))
    starts = [sum(len(t) for t in tables[:b]) for b in range(len(tables))]
    block_ids = torch.tensor([block for table in tables for block in table])
    kernel.decode_attention(
        library, q, k_cache, v_cache, block_ids, torch.tensor(starts), torch.tensor(lens),
        block_size, scale, out,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("block_size", [1, 4, 16, 64])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), SHAPES)
def test_kernel_matches_sdpa(
    library: ctypes.CDLL, heads: int, kv_heads: int, head_dim: int, block_size: int
) -> None:
    if not kernel.supports(heads, kv_heads, head_dim):
        assert head_dim % 16  # the one shape here the kernel leaves to SDPA
        return
    rng = random.Random(heads * head_dim + block_size)
    lens = [1, 2, 15, 16, 17, 31, 33, 300] + [rng.randint(1, 200) for _ in range(8)]
    num_blocks = sum(-(-n // block_size) for n in lens) + 7  # spare blocks nobody reads
    free = list(range(num_blocks))
    rng.shuffle(free)  # block tables in no particular order, as the block manager leaves them
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    shared = lens[6] // block_size  # the full blocks of the 33-key sequence
    tables[-1][:shared] = tables[6][:shared]  # a prefix-cache hit: blocks shared by two
    lens[-1] = max(lens[-1], shared * block_size + 1)
    tables[-1] += [free.pop() for _ in range(-(-lens[-1] // block_size) - len(tables[-1]))]
    gen = torch.Generator().manual_seed(0)
    rows = num_blocks * block_size
    k_cache = torch.randn(kv_heads, rows, head_dim, generator=gen) * 3  # peaky softmaxes
    v_cache = torch.randn(kv_heads, rows, head_dim, generator=gen)
    q = torch.randn(len(lens), heads, head_dim, generator=gen)
    scale = head_dim**-0.5
    torch.testing.assert_close(
        run(library, q, k_cache, v_cache, tables, lens, block_size, scale),
        reference(q, k_cache, v_cache, tables, lens, block_size, scale),
        rtol=1e-5,
        atol=2e-6,
    )


@pytest.mark.parametrize("num_threads", [2, 3, 4, 8])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (32, 8, 128)])
def test_one_sequence_split_over_the_threads(
    library: ctypes.CDLL, threads: None, num_threads: int, heads: int, kv_heads: int,
    head_dim: int,
) -> None:  # fmt: skip
    """A token alone has fewer (token, kv head) items than threads: its keys are split
    into spans, their partial softmaxes merged. Lengths around the span and chunk sizes,
    one with a key whose score dominates (the merge's rescaling)."""
    torch.set_num_threads(num_threads)
    gen = torch.Generator().manual_seed(num_threads)
    block_size = 16
    for n in [1, 31, 63, 64, 65, 100, 257, 1000]:
        blocks = list(range(-(-n // block_size)))
        random.Random(n).shuffle(blocks)
        rows = len(blocks) * block_size
        k_cache = torch.randn(kv_heads, rows, head_dim, generator=gen) * 3
        v_cache = torch.randn(kv_heads, rows, head_dim, generator=gen)
        q = torch.randn(1, heads, head_dim, generator=gen)
        if n == 257:  # one key far above the rest, in the last span
            k_cache[:, blocks[-1] * block_size] = q[0, :: heads // kv_heads] * 10
        scale = head_dim**-0.5
        torch.testing.assert_close(
            run(library, q, k_cache, v_cache, [blocks], [n], block_size, scale),
            reference(q, k_cache, v_cache, [blocks], [n], block_size, scale),
            rtol=1e-5,
            atol=2e-6,
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
