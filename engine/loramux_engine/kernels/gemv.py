"""The CPU matrix-vector kernel for steps of up to 64 tokens (gemv.c), via ctypes."""

from __future__ import annotations

import ctypes

import torch

from loramux_engine.kernels.build import load_library

MAX_TOKENS = 64  # as in the C source


def _declare(library: ctypes.CDLL) -> None:
    fn = library.gemv
    fn.restype = ctypes.c_int
    c_ptr, c_int64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [c_ptr, c_int64, c_ptr, c_ptr, c_ptr, c_int64, c_int64, c_int64, c_int64]
    fn.argtypes += [ctypes.c_int]
    read = library.read_sum
    read.restype = ctypes.c_float
    read.argtypes = [c_ptr, c_int64, ctypes.c_int]
    argmax = library.row_argmax
    argmax.restype = ctypes.c_int
    argmax.argtypes = [c_ptr, c_int64, c_int64, c_ptr, c_ptr]


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None when it cannot be built here (logged once)."""
    return load_library("gemv", _declare)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes these operands (CPU fp32, a row-major x of few tokens)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 2
        and x.shape[0] <= MAX_TOKENS
        and x.stride(1) == 1
        and weight.is_contiguous()
    )


def gemv(
    library: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    # x: [num_tokens, in], at most MAX_TOKENS rows; weight: [out, in] contiguous;
    # bias: [out] -> x @ weight.T + bias: [num_tokens, out]
    num_tokens, width = x.shape
    out, in_features = weight.shape
    if width != in_features or (bias is not None and bias.shape != (out,)):
        raise ValueError(f"gemv: x {tuple(x.shape)} against a weight {(out, in_features)}")
    y = x.new_empty(num_tokens, out)
    status = library.gemv(
        x.data_ptr(), x.stride(0), weight.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), out,
        num_tokens, out, in_features, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"gemv kernel failed with status {status} for {tuple(x.shape)}")
    return y


def read_sum(library: ctypes.CDLL, x: torch.Tensor, num_threads: int) -> float:
    """The sum of a contiguous fp32 tensor, read once with the GEMV's loads (a bandwidth
    probe for bench engine)."""
    if not (x.is_cpu and x.dtype == torch.float32 and x.is_contiguous()):
        raise ValueError("read_sum takes a contiguous fp32 CPU tensor")
    return float(library.read_sum(x.data_ptr(), x.numel(), num_threads))


def row_argmax(library: ctypes.CDLL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximum (NaN where the row holds one, as ``amax``) and the index of its
    first occurrence (as ``argmax``), in one pass; x: [rows, cols] contiguous fp32 CPU."""
    if not (x.is_cpu and x.dtype == torch.float32 and x.is_contiguous() and x.dim() == 2):
        raise ValueError("row_argmax takes a contiguous 2-d fp32 CPU tensor")
    rows, cols = x.shape
    top = torch.empty(rows, dtype=torch.float32)
    index = torch.empty(rows, dtype=torch.int64)
    status = library.row_argmax(x.data_ptr(), rows, cols, top.data_ptr(), index.data_ptr())
    if status != 0:
        raise ValueError(f"row_argmax: a row of {cols} values is outside what it takes")
    return top, index
