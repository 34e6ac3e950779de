"""The CPU multi-LoRA kernel over runs of tokens on one slot (lora_runs.c), via ctypes."""

from __future__ import annotations

import ctypes

import torch

from loramux_engine.kernels.build import load_library

MAX_RUN_TOKENS = 64  # as in the C source
MAX_RANK = 256


def _declare(library: ctypes.CDLL) -> None:
    fn = library.lora_runs
    fn.restype = ctypes.c_int
    c_ptr, c_int64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [c_ptr, c_int64, c_ptr, c_int64, c_ptr, c_ptr, c_ptr, c_ptr, c_ptr]
    fn.argtypes += [c_int64] * 4 + [ctypes.c_int]


def load() -> ctypes.CDLL | None:
    return load_library("lora_runs", _declare)


def supports(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor) -> bool:
    """Whether the kernel takes these operands (CPU fp32, row-major rows, sizes of 16)."""
    tensors = (x, y, a, b_t)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and x.stride(1) == 1
        and y.stride(1) == 1
        and a.is_contiguous()
        and b_t.is_contiguous()
        and x.shape[1] % 16 == 0
        and y.shape[1] % 16 == 0
        and a.shape[1] <= MAX_RANK
    )


def lora_runs(
    library: ctypes.CDLL,
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b_t: torch.Tensor,
    scale: torch.Tensor,
    ranks: torch.Tensor,
    runs: torch.Tensor,
) -> None:
    # y: [num_tokens, out] += per run; x: [num_tokens, in]; a: [slots, max_rank, in];
    # b_t: [slots, max_rank, out]; scale: [slots] fp32; ranks: [slots] int64;
    # runs: [num_runs, 3] int64 (slot, start, end), each run at most MAX_RUN_TOKENS long
    status = library.lora_runs(
        x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
        a.data_ptr(), b_t.data_ptr(), scale.data_ptr(), ranks.data_ptr(), runs.data_ptr(),
        runs.shape[0], a.shape[1], x.shape[1], y.shape[1], torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"lora_runs kernel failed with status {status}")
