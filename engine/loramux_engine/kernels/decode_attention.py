"""The CPU decode-attention kernel: a small C file compiled once per machine, called via ctypes.

Plain C (no torch headers) compiles in about a second; ctypes releases the GIL
during the call. Built with -fopenmp, it runs on the OpenMP runtime torch has already
loaded (same soname), so it shares torch's threads; a compiler without OpenMP builds it
serial. Without a C compiler the engine falls back to per-sequence SDPA.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("decode_attention.c")
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
_OPENMP = "-fopenmp"
MAX_GROUP = 16  # query heads per kv head, as in the C source
MAX_CHUNKS = 16  # head_dim / 16
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "loramux_engine"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compile(flags: list[str], target: Path) -> None:
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *flags, str(_SOURCE), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
        )
        os.replace(built, target)  # atomic: concurrent builders never see a partial file


def _build() -> ctypes.CDLL:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + _cpu_signature().encode())
    target = _cache_dir() / f"decode_attention-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            _compile([*_FLAGS, _OPENMP], target)
        except subprocess.CalledProcessError:
            _compile(_FLAGS, target)
    library = ctypes.CDLL(str(target))
    fn = library.decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]
    return library


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None when it cannot be built here (logged once)."""
    global _library, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _library = _build()
            except (OSError, subprocess.CalledProcessError) as e:
                logger.warning("CPU decode-attention kernel unavailable, using SDPA: %s", e)
        return _library


def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes this attention shape (else the engine uses SDPA)."""
    if num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP:
        return False
    return head_dim % 16 == 0 and head_dim // 16 <= MAX_CHUNKS


def decode_attention(
    library: ctypes.CDLL,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    # q, out: [num_seqs, heads, head_dim] fp32 contiguous;
    # k_cache, v_cache: [kv_heads, cache_rows, head_dim] contiguous; starts, lens: [num_seqs] int64
    tensors = (q, k_cache, v_cache, starts, lens, out)
    if not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors):
        raise ValueError("decode_attention needs contiguous CPU tensors")
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, cache_rows, _ = k_cache.shape
    status = library.decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
        starts.data_ptr(), lens.data_ptr(),
        num_seqs, num_heads, num_kv_heads, head_dim, cache_rows,
        scale, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"decode_attention kernel failed with status {status}")
