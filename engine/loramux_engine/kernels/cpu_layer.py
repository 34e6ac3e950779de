"""A LLaMA decoder layer in one to four C calls for steps of few tokens (cpu_layer.c).

The structures mirror the C ones field for field (every field 8 bytes wide); the pointers
they hold are the data of tensors the caller keeps alive (models/cpu_decode.py).
"""

from __future__ import annotations

import ctypes

from loramux_engine.kernels.build import load_library

MAX_TOKENS = 64  # as in the C source
PART_QKV, PART_ATTEND, PART_MLP_IN, PART_MLP_OUT = 1, 2, 4, 8
FP32, INT8, INT4 = 0, 1, 2

_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64


class Matrix(ctypes.Structure):
    _fields_ = [
        ("kind", _i64),
        ("out", _i64),
        ("in_", _i64),
        ("group", _i64),
        ("w", _ptr),
        ("scale", _ptr),
        ("minimum", _ptr),
        ("bias", _ptr),
    ]


class Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _ptr),
        ("post_norm", _ptr),
        ("qkv", Matrix * 3),
        ("o", Matrix),
        ("gate_up", Matrix * 2),
        ("down", Matrix),
        ("k_cache", _ptr),
        ("v_cache", _ptr),
    ]


class Model(ctypes.Structure):
    _fields_ = [
        ("hidden", _i64),
        ("num_heads", _i64),
        ("num_kv_heads", _i64),
        ("head_dim", _i64),
        ("intermediate", _i64),
        ("cache_rows", _i64),
        ("block_shift", _i64),
        ("max_positions", _i64),
        ("num_layers", _i64),
        ("eps", ctypes.c_double),
        ("scale", ctypes.c_double),
        ("cos_sin", _ptr),
        ("layers", ctypes.POINTER(Layer)),
        ("final_norm", _ptr),
        ("final_eps", ctypes.c_double),
    ]


class Step(ctypes.Structure):
    _fields_ = [
        ("num_tokens", _i64),
        ("num_threads", _i64),
        ("num_block_ids", _i64),
        ("positions", _ptr),
        ("cache_positions", _ptr),
        ("block_ids", _ptr),
        ("table_starts", _ptr),
        ("lens", _ptr),
        ("h", _ptr),
        ("residual", _ptr),
        ("normed", _ptr),
        ("qkv", _ptr),
        ("attn", _ptr),
        ("gate_up", _ptr),
        ("act", _ptr),
    ]


def _declare(library: ctypes.CDLL) -> None:
    parts = library.layer_parts
    parts.restype = ctypes.c_int
    parts.argtypes = [ctypes.POINTER(Model), _i64, ctypes.POINTER(Step), ctypes.c_int]
    every = library.all_layers
    every.restype = ctypes.c_int
    every.argtypes = [ctypes.POINTER(Model), ctypes.POINTER(Step)]


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None when it cannot be built here (logged once)."""
    return load_library("cpu_layer", _declare)


def check(status: int) -> None:
    if status == -2:
        raise RuntimeError("cpu_layer: a position, cache row or block table out of range")
    if status != 0:
        raise RuntimeError(f"cpu_layer kernel failed with status {status}")
