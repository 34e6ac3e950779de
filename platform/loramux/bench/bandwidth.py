"""A decode step's memory-bandwidth bound: the bytes it must read over the bandwidth.

A decode step reads every weight once (the layers, the final norm and the LM head; the
embedding's few rows are left out) and each sequence's keys and values so far. The bound is
the time those bytes take at the memory's bandwidth: an H200's datasheet figure on CUDA, a
measured copy on a CPU.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from loramux.bench.engine import sync

H200_HBM_BYTES_PER_S = 4.8e12  # HBM3e, by the datasheet
COPY_BYTES_CPU = 256 << 20
COPY_BYTES_CUDA = 4 << 30  # some milliseconds on an H200


@dataclass(frozen=True, slots=True)
class DecodeStep:
    seconds: float
    num_seqs: int
    kv_tokens: int  # keys and values read: each sequence's tokens so far, its new one included


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read and written per second by the best of five copies of one tensor."""
    num_bytes = COPY_BYTES_CUDA if device.type == "cuda" else COPY_BYTES_CPU
    src = torch.full((num_bytes,), 1, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # pages touched, kernels loaded
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best


def read_bandwidth(num_threads: int) -> dict[str, float]:
    """A CPU's read bandwidth with ``num_threads`` threads: the best of five passes over
    256 MiB (far beyond the caches) by torch's sum and by the engine's read loop
    (kernels/gemv.c, the GEMV's own loads, when it builds here); ``bytes_per_s`` is the
    higher, so a bound computed from it is the tighter one."""
    from loramux_engine.kernels import gemv

    buffer = torch.ones(COPY_BYTES_CPU // 4, dtype=torch.float32)
    library = gemv.load()
    readers = {"torch_sum": lambda: float(buffer.sum())}
    if library is not None:
        readers["c_read"] = lambda: gemv.read_sum(library, buffer, num_threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        best = dict.fromkeys(readers, float("inf"))
        for _ in range(5):  # interleaved: a burst of others' load hits both alike
            for name, read in readers.items():
                start = time.perf_counter()
                read()
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    rates = {f"{name}_bytes_per_s": COPY_BYTES_CPU / s for name, s in best.items()}
    return {"bytes_per_s": max(rates.values()), **rates}


def weight_bytes_per_step(args: Any, itemsize: int) -> int:
    """Bytes of the weights a decode step reads (module docstring); ``args``: ModelArgs."""
    hidden, heads, kv_heads = args.hidden_size, args.num_heads, args.num_kv_heads
    attention = 2 * hidden * heads * args.head_dim + 2 * hidden * kv_heads * args.head_dim
    layer = attention + 3 * hidden * args.intermediate_size + 2 * hidden
    return (args.num_layers * layer + hidden + args.vocab_size * hidden) * itemsize


def decode_bound(
    steps: list[DecodeStep], weight_bytes: int, kv_bytes_per_token: int, bandwidth: float
) -> dict[str, Any]:
    measured = sum(s.seconds for s in steps)
    read = sum(weight_bytes + s.kv_tokens * kv_bytes_per_token for s in steps)
    return {
        "num_steps": len(steps),
        "mean_batch_size": statistics.fmean(s.num_seqs for s in steps),
        "step_p50_s": statistics.median(s.seconds for s in steps),
        "weight_bytes_per_step": weight_bytes,
        "mean_kv_bytes_per_step": statistics.fmean(s.kv_tokens for s in steps) * kv_bytes_per_token,
        "bandwidth_bytes_per_s": bandwidth,
        "achieved_bytes_per_s": read / measured,
        "bound_s": read / bandwidth,
        "measured_s": measured,
    }
