"""The CPU int8 / int4 weight-only matmuls with fp32 activations (quant_matmul.c, its cores in
quant_rows.h), via ctypes."""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from loramux_engine.kernels.build import load_library


def _declare(library: ctypes.CDLL) -> None:
    c_ptr, c_int64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures: dict[str, list[type[ctypes._SimpleCData[Any]]]] = {
        "int8_matmul": [c_ptr, c_int64, c_ptr, c_ptr, c_ptr, c_int64, c_int64, c_int64, c_int],
        "int4_matmul": [
            *(c_ptr, c_int64, c_ptr, c_ptr, c_ptr, c_int64, c_ptr),
            *(c_int64, c_int64, c_int64, c_int),
        ],
        # quant_rows.h's cores on the calling thread: rows [begin, end), y's row stride
        "int8_rows_range": [c_ptr, c_int64, c_ptr, c_ptr, c_ptr, *(c_int64,) * 5],
        "int4_rows_range": [c_ptr, c_int64, c_ptr, c_ptr, c_ptr, c_int64, c_ptr, *(c_int64,) * 5],
        "int8_dequantize": [c_ptr, c_ptr, c_ptr, c_int64, c_int64, c_int],
        "int4_dequantize": [c_ptr, c_ptr, c_ptr, c_int64, c_ptr, c_int64, c_int64, c_int],
    }
    for name, argtypes in signatures.items():
        fn = getattr(library, name)
        fn.restype = c_int
        fn.argtypes = argtypes


def load() -> ctypes.CDLL | None:
    return load_library("quant_matmul", _declare)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``q: [out, in]`` codes in [0, 15] -> ``[out, in / 2] uint8``: per 32-weight chunk, byte j
    holds weight j (low nibble) and weight 16 + j (high nibble)."""
    chunks = q.to(torch.uint8).view(q.shape[0], -1, 2, 16)
    return (chunks[:, :, 0] | chunks[:, :, 1] << 4).reshape(q.shape[0], -1).contiguous()


def _check(status: int, name: str) -> None:
    if status != 0:
        raise RuntimeError(f"{name} kernel refused its shapes (status {status})")


def _check_operands(
    x: torch.Tensor, width: int, *parts: tuple[torch.Tensor, tuple[int, ...]]
) -> None:
    """What the C kernels read past without these: x [tokens, width] fp32 with contiguous rows
    on the CPU, and each weight part contiguous with exactly its expected shape."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"x must be a 2-D fp32 CPU tensor, not {x.dtype} {tuple(x.shape)}")
    if x.shape[1] != width:
        raise ValueError(f"x has width {x.shape[1]}, the weight {width}")
    if x.shape[0] > 0 and x.stride(1) != 1:
        raise ValueError("x's rows must be contiguous")
    for part, shape in parts:
        if tuple(part.shape) != shape or not part.is_contiguous() or part.device.type != "cpu":
            raise ValueError(f"a weight part has shape {tuple(part.shape)}, not {shape}")


def int8_matmul(
    library: ctypes.CDLL, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    # x: [num_tokens, in] fp32, rows contiguous; q: [out, in] int8; scale: [out] fp32
    _check_operands(x, q.shape[1], (q, tuple(q.shape)), (scale, (q.shape[0],)))
    if q.dtype != torch.int8 or scale.dtype != torch.float32:
        raise ValueError("int8_matmul takes int8 codes and fp32 scales")
    y = torch.empty(x.shape[0], q.shape[0], dtype=torch.float32)
    status = library.int8_matmul(
        x.data_ptr(), x.stride(0), q.data_ptr(), scale.data_ptr(), y.data_ptr(),
        x.shape[0], q.shape[1], q.shape[0], torch.get_num_threads(),
    )  # fmt: skip
    _check(status, "int8_matmul")
    return y


def int4_matmul(
    library: ctypes.CDLL,
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    # x: [num_tokens, in] fp32, rows contiguous; packed: [out, in / 2] (pack_int4);
    # scale, minimum: [out, in / group_size] fp32
    out, width = packed.shape[0], packed.shape[1] * 2
    if group_size < 1 or width % group_size:
        raise ValueError(f"group size {group_size} does not divide the width {width}")
    groups = (out, width // group_size)
    _check_operands(x, width, (packed, tuple(packed.shape)), (scale, groups), (minimum, groups))
    if packed.dtype != torch.uint8 or scale.dtype != torch.float32 or minimum.dtype != scale.dtype:
        raise ValueError("int4_matmul takes packed uint8 codes and fp32 scales and minimums")
    y = torch.empty(x.shape[0], packed.shape[0], dtype=torch.float32)
    status = library.int4_matmul(
        x.data_ptr(), x.stride(0), packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(),
        group_size, y.data_ptr(), x.shape[0], packed.shape[1] * 2, packed.shape[0],
        torch.get_num_threads(),
    )  # fmt: skip
    _check(status, "int4_matmul")
    return y


def int8_dequantize(library: ctypes.CDLL, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # q: [out, in] int8; scale: [out] fp32 -> [out, in] fp32
    w = torch.empty(q.shape, dtype=torch.float32)
    status = library.int8_dequantize(
        q.data_ptr(), scale.data_ptr(), w.data_ptr(), q.shape[1], q.shape[0],
        torch.get_num_threads(),
    )  # fmt: skip
    _check(status, "int8_dequantize")
    return w


def int4_dequantize(
    library: ctypes.CDLL,
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    # packed: [out, in / 2] (pack_int4); scale, minimum: [out, in / group_size] fp32
    w = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
    status = library.int4_dequantize(
        packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), group_size, w.data_ptr(),
        w.shape[1], w.shape[0], torch.get_num_threads(),
    )  # fmt: skip
    _check(status, "int4_dequantize")
    return w
