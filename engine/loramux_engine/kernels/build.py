"""Compile the engine's small C kernels once per machine and load them with ctypes.

Plain C (no torch headers) compiles in about a second. Built with -fopenmp, a kernel
links libgomp.so.1, which the loader resolves to the copy torch has already loaded (same
soname), so its threads are torch's own; a compiler without OpenMP builds it serial.
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
from collections.abc import Callable
from pathlib import Path

import torch  # noqa: F401 - its OpenMP runtime must be loaded before a kernel's

logger = logging.getLogger(__name__)

_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
_OPENMP = "-fopenmp"
_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL | None] = {}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "loramux_engine"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compile(source: Path, flags: list[str], target: Path) -> None:
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *flags, str(source), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
        )
        os.replace(built, target)  # atomic: concurrent builders never see a partial file


def _build(name: str) -> ctypes.CDLL:
    source = Path(__file__).with_name(f"{name}.c")
    headers = sorted(source.parent.glob("*.h"))  # what the sources #include
    text = b"".join(path.read_bytes() for path in [source, *headers])
    key = hashlib.sha256(text + " ".join(_FLAGS).encode() + _cpu_signature().encode())
    target = _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            _compile(source, [*_FLAGS, _OPENMP], target)
        except subprocess.CalledProcessError:
            _compile(source, _FLAGS, target)
    return ctypes.CDLL(str(target))


def load_library(name: str, declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | None:
    """kernels/<name>.c compiled and loaded, ``declare`` setting its signatures; None when
    it cannot be built here (logged once)."""
    with _lock:
        if name not in _libraries:
            try:
                library = _build(name)
                declare(library)
                _libraries[name] = library
            except (OSError, subprocess.CalledProcessError, AttributeError) as e:
                logger.warning("CPU kernel %s unavailable, using the torch path: %s", name, e)
                _libraries[name] = None
        return _libraries[name]
