"""quant_rows.h's cores (the CPU int8 / int4 matmuls' rows [begin, end), which cpu_layer.c calls
inside its own OpenMP region) against the fp32 dequantized reference: any row range, token
counts around the register blocks (2 tokens on AVX2, 4 on AVX-512 and the portable build),
y written with its own row stride, and the int4 weights rebuilt bit for bit.

Each check runs on the library as built for this machine and on a build forced to the portable
16-float path (what a host without AVX2 compiles, with the AVX-512 build's blocking), so both
blockings are exercised on any x86 host.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from loramux_engine.kernels import quant_matmul
from loramux_engine.layers.quant import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)

KERNELS = Path(quant_matmul.__file__).parent


def _portable(tmp: Path) -> ctypes.CDLL | None:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return None
    target = tmp / "quant_matmul_portable.so"
    flags = ["-O2", "-march=native", "-shared", "-fPIC", "-DQUANT_ROWS_PORTABLE"]
    subprocess.run(
        [compiler, *flags, str(KERNELS / "quant_matmul.c"), "-o", str(target), "-lm"],
        check=True,
        capture_output=True,
    )
    library = ctypes.CDLL(str(target))
    quant_matmul._declare(library)
    return library


@pytest.fixture(scope="module", params=["native", "portable"])
def library(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> ctypes.CDLL:
    built = (
        quant_matmul.load()
        if request.param == "native"
        else _portable(tmp_path_factory.mktemp("portable"))
    )
    if built is None:
        pytest.skip("no C compiler here")
    return built


class _Weights:
    """One weight quantized both ways, with its fp32 dequantizations (the references)."""

    def __init__(self, out: int, inp: int, group: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(out, inp, generator=gen) * 0.05
        self.q8, self.scale8 = quantize_int8(w)
        q4, scale4, minimum4 = quantize_int4(w, group)
        self.packed = quant_matmul.pack_int4(q4)
        self.scale4, self.minimum4, self.group = scale4.float(), minimum4.float(), group
        self.dense8 = dequantize_int8(self.q8, self.scale8)
        self.dense4 = dequantize_int4(q4, scale4, minimum4, group)


def _rows(
    library: ctypes.CDLL, kind: str, x: torch.Tensor, w: _Weights, y: torch.Tensor,
    column: int, begin: int, end: int,
) -> int:  # fmt: skip
    """library.<kind>_rows_range writing rows [begin, end) of x @ w.T from y[:, column]."""
    y_ptr = y.data_ptr() + column * y.element_size()
    num_tokens, inp = x.shape
    if kind == "int8":
        return int(
            library.int8_rows_range(
                x.data_ptr(), x.stride(0), w.q8.data_ptr(), w.scale8.data_ptr(), y_ptr,
                y.stride(0), num_tokens, inp, begin, end,
            )
        )  # fmt: skip
    return int(
        library.int4_rows_range(
            x.data_ptr(), x.stride(0), w.packed.data_ptr(), w.scale4.data_ptr(),
            w.minimum4.data_ptr(), w.group, y_ptr, y.stride(0), num_tokens, inp, begin, end,
        )
    )  # fmt: skip


RANGES = [(0, 23), (1, 6), (3, 10), (5, 5), (7, 8), (2, 23), (19, 23), (4, 12)]


@pytest.mark.parametrize("num_tokens", range(1, 10))
@pytest.mark.parametrize(("inp", "group"), [(96, 32), (128, 64)])
def test_row_ranges_equal_the_dequantized_reference(
    library: ctypes.CDLL, num_tokens: int, inp: int, group: int
) -> None:
    out, column, y_stride = 23, 5, 23 + 11  # y: q, k, v side by side, as cpu_layer.c writes
    w = _Weights(out, inp, group, seed=num_tokens * 100 + inp)
    gen = torch.Generator().manual_seed(num_tokens)
    # rows of a wider tensor: the cores follow x's row stride
    x = torch.randn(num_tokens, inp + 7, generator=gen)[:, 2 : inp + 2]
    for kind, dense in (("int8", w.dense8), ("int4", w.dense4)):
        expected = (x.double() @ dense.double().T).float()
        for begin, end in RANGES:
            y = torch.full((num_tokens, y_stride), float("nan"))
            assert _rows(library, kind, x, w, y, column, begin, end) == 0
            got = y[:, column + begin : column + end]
            torch.testing.assert_close(got, expected[:, begin:end], atol=1e-5, rtol=1e-5)
            # nothing written outside the range, in any token's row
            outside = torch.cat([y[:, : column + begin], y[:, column + end :]], dim=1)
            assert outside.isnan().all(), (kind, begin, end)


def test_one_hot_tokens_read_back_the_weights_bit_for_bit(library: ctypes.CDLL) -> None:
    """Token k = the k-th unit vector: y[k, n] = w[n, k] with every other product an exact zero,
    so the kernels' own weights show through: int8 scale * q, int4 fma(q, scale, min), equal
    to the fp32 dequantization's bit for bit. 64 tokens: the most cpu_layer.c passes."""
    inp, out = 64, 13
    w = _Weights(out, inp, 32, seed=7)
    x = torch.eye(inp)
    for kind, dense in (("int8", w.dense8), ("int4", w.dense4)):
        y = torch.full((inp, out), float("nan"))
        assert _rows(library, kind, x, w, y, 0, 0, out) == 0
        assert torch.equal(y, dense.T), kind
        y = torch.full((inp, out + 3), float("nan"))
        assert _rows(library, kind, x, w, y, 3, 1, out) == 0
        assert torch.equal(y[:, 4:], dense.T[:, 1:]), kind


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 5])
def test_threads_share_rows_without_changing_a_bit(library: ctypes.CDLL, num_tokens: int) -> None:
    """The OpenMP wrappers cut whole 4-row blocks, so every row is summed as on one thread."""
    out, inp = 37, 96
    w = _Weights(out, inp, 32, seed=num_tokens)
    x = torch.randn(num_tokens, inp, generator=torch.Generator().manual_seed(1))
    alone = {kind: torch.full((num_tokens, out), float("nan")) for kind in ("int8", "int4")}
    for kind, y in alone.items():
        assert _rows(library, kind, x, w, y, 0, 0, out) == 0
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        shared8 = quant_matmul.int8_matmul(library, x, w.q8, w.scale8)
        shared4 = quant_matmul.int4_matmul(library, x, w.packed, w.scale4, w.minimum4, 32)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(shared8, alone["int8"])
    assert torch.equal(shared4, alone["int4"])


def test_row_cores_refuse_shapes_they_would_misread(library: ctypes.CDLL) -> None:
    w = _Weights(8, 64, 32, seed=3)
    x, y = torch.randn(2, 64), torch.empty(2, 8)
    assert _rows(library, "int8", x, w, y, 0, 4, 2) == -1  # end before begin
    assert _rows(library, "int4", x, w, y, 0, -1, 2) == -1
    assert library.int8_rows_range(0, 40, 0, 0, 0, 8, 1, 40, 0, 1) == -1  # width % 16
    assert library.int4_rows_range(0, 64, 0, 0, 0, 48, 0, 8, 1, 64, 0, 1) == -1  # group % 32
