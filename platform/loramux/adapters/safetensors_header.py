"""Read and check a safetensors header from a stream with bounded memory.

Only the first 8 bytes and the JSON header are read, never tensor data, and the header
is capped far below the library's 100 MB. Every tensor must lie inside the file, the
tensors must tile the data section exactly (contiguous, no overlap, no gap), dtypes must
be ones the engine accepts and no shape may claim more bytes than the file holds.

``HeaderPrefix`` lets the engine's own name and shape check
(``loramux_engine.lora.adapter.check_weights_header``, which takes the file's bytes) run
on the header alone: it answers the file's length and the header slices, nothing more.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import IO, Any

from loramux.adapters.errors import AdapterRejected
from loramux_engine.lora.safetensors_header import FLOAT_DTYPES

MAX_HEADER_BYTES = 1 << 20
MAX_DIMS = 8
WEIGHTS_NAME = "adapter_model.safetensors"
NOT_SAFETENSORS = (
    f"{WEIGHTS_NAME} is not a safetensors file ({{}}); pickled PyTorch weights "
    "(.bin, .pt) are refused: save the adapter with safe_serialization=True"
)


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    prefix: bytes  # the 8-byte length and the JSON header, exactly as in the file
    file_size: int
    num_tensors: int

    def as_file_bytes(self) -> bytes:
        """A stand-in for the file's bytes that the engine's header check accepts."""
        view: Any = HeaderPrefix(self.prefix, self.file_size)
        return view  # type: ignore[no-any-return]


class HeaderPrefix:
    """``len()`` is the whole file's; slicing is allowed inside the header only."""

    def __init__(self, prefix: bytes, file_size: int) -> None:
        self._prefix = prefix
        self._file_size = file_size

    def __len__(self) -> int:
        return self._file_size

    def __getitem__(self, item: slice) -> bytes:
        if not isinstance(item, slice) or (item.stop or 0) > len(self._prefix):
            raise IndexError("only the safetensors header was read")
        return self._prefix[item]


def _refuse(reason: str) -> AdapterRejected:
    return AdapterRejected(f"{WEIGHTS_NAME} is invalid: {reason}")


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    parts, remaining = [], size
    while remaining > 0:
        chunk = stream.read(min(remaining, 1 << 16))
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _refuse(f"tensor {key!r} appears twice in the header")
        result[key] = value
    return result


def read_safetensors_header(
    stream: IO[bytes], file_size: int, *, max_tensors: int
) -> SafetensorsHeader:
    """Check the header of a ``file_size``-byte safetensors stream positioned at its start."""
    if file_size < 8:
        raise AdapterRejected(NOT_SAFETENSORS.format(f"only {file_size} bytes"))
    (header_len,) = struct.unpack("<Q", _read_exact(stream, 8))
    data_len = file_size - 8 - header_len
    if header_len > MAX_HEADER_BYTES and header_len > file_size - 8:
        raise AdapterRejected(NOT_SAFETENSORS.format("its first 8 bytes are no header length"))
    if header_len > MAX_HEADER_BYTES:
        raise _refuse(
            f"its header is {header_len} bytes, over the {MAX_HEADER_BYTES}-byte limit "
            "(an adapter's header is a few KB)"
        )
    if data_len < 0:
        raise _refuse(
            f"the header claims {header_len} bytes but the file has only {file_size - 8} "
            "after its length field (truncated file?)"
        )
    raw = _read_exact(stream, header_len)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterRejected(NOT_SAFETENSORS.format("its header is not JSON")) from None
    if not isinstance(header, dict):
        raise AdapterRejected(NOT_SAFETENSORS.format("its header is not a JSON object"))
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _refuse("__metadata__ must map strings to strings")
    if len(header) > max_tensors:
        raise _refuse(
            f"it holds {len(header)} tensors; a LoRA adapter for this base model has at most "
            f"{max_tensors}"
        )
    spans = sorted(_check_entry(name, entry, data_len) for name, entry in header.items())
    _check_tiling(spans, data_len)
    return SafetensorsHeader(
        prefix=struct.pack("<Q", header_len) + raw, file_size=file_size, num_tensors=len(header)
    )


def _check_entry(name: str, entry: Any, data_len: int) -> tuple[int, int, str]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _refuse(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in FLOAT_DTYPES:
        raise _refuse(
            f"tensor {name!r} has dtype {dtype!r}; only {sorted(FLOAT_DTYPES)} are accepted"
        )
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_DIMS
        and all(type(d) is int and d >= 0 for d in shape)
    ):
        raise _refuse(f"tensor {name!r} has an invalid shape {str(shape)[:80]}")
    num_bytes = math.prod(shape) * FLOAT_DTYPES[dtype]
    if num_bytes > data_len:
        raise _refuse(
            f"tensor {name!r} has shape {shape}, which needs {num_bytes} bytes; the file holds "
            f"{data_len} bytes of tensor data"
        )
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
    ):
        raise _refuse(f"tensor {name!r} has invalid data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _refuse(
            f"tensor {name!r} has data_offsets [{begin}, {end}] outside the file's "
            f"{data_len} bytes of tensor data"
        )
    if end - begin != num_bytes:
        raise _refuse(
            f"tensor {name!r} spans {end - begin} bytes but its dtype and shape need {num_bytes}"
        )
    return begin, end, name


def _check_tiling(spans: list[tuple[int, int, str]], data_len: int) -> None:
    position, previous = 0, None
    for begin, end, name in spans:
        if begin < position:
            raise _refuse(f"tensors {previous!r} and {name!r} overlap")
        if begin > position:
            raise _refuse(f"{begin - position} unused bytes lie before tensor {name!r}")
        position, previous = end, name
    if position != data_len:
        raise _refuse(f"{data_len - position} bytes after the last tensor belong to no tensor")
