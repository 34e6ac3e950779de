"""Read and check a safetensors header with bounded memory, never reading a tensor.

Layout: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that
follows), plus an optional ``__metadata__`` object of strings.

The one reader of adapter weights headers, for the platform at upload (from the upload's
stream) and for the engine before it loads a file: only the first 8 bytes and the JSON
header are read, the header is capped far below the library's 100 MB, every tensor must
lie inside the file, the tensors must tile the data section exactly (contiguous, no
overlap, no gap), dtypes must be ones the engine accepts, and no shape may claim more
bytes than the file holds.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from typing import IO, Any

from loramux_engine.lora.errors import UnsupportedAdapterError
from loramux_engine.lora.files import WEIGHTS_NAME
from loramux_engine.utils import bounded_json

MAX_HEADER_BYTES = 1 << 20
MAX_DIMS = 8
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
NOT_SAFETENSORS = (
    f"{WEIGHTS_NAME} is not a safetensors file ({{}}); pickled PyTorch weights "
    "(.bin, .pt) are refused: save the adapter with safe_serialization=True"
)


@dataclass(frozen=True, slots=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]


def _refuse(reason: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(f"{WEIGHTS_NAME} is invalid: {reason}")


def _not_safetensors(reason: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(NOT_SAFETENSORS.format(reason))


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


def read_header_stream(
    stream: IO[bytes], file_size: int, *, max_tensors: int
) -> dict[str, TensorEntry]:
    """Check the header of a ``file_size``-byte stream positioned at its start.

    Returns name -> (dtype, shape); the stream is left just past the header.
    """
    if file_size < 8:
        raise _not_safetensors(f"only {file_size} bytes")
    (header_len,) = struct.unpack("<Q", _read_exact(stream, 8))
    data_len = file_size - 8 - header_len
    if header_len > MAX_HEADER_BYTES and header_len > file_size - 8:
        raise _not_safetensors("its first 8 bytes are no header length")
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
        header = bounded_json.loads(raw, object_pairs_hook=_no_duplicates)
    except bounded_json.JSONLimitError as error:
        raise _not_safetensors(f"its header is not JSON within limits: {error}") from None
    if not isinstance(header, dict):
        raise _not_safetensors("its header is not a JSON object")
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
    return {
        name: TensorEntry(dtype=entry["dtype"], shape=tuple(entry["shape"]))
        for name, entry in header.items()
    }


def read_header(data: bytes, *, max_tensors: int) -> dict[str, TensorEntry]:
    """``read_header_stream`` over a whole file already in memory."""
    return read_header_stream(io.BytesIO(data), len(data), max_tensors=max_tensors)


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
