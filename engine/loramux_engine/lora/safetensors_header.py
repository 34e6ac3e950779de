"""Read a safetensors header without reading any tensor.

Layout: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that
follows), plus an optional ``__metadata__`` object of strings.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from loramux_engine.lora.errors import UnsupportedAdapterError

MAX_HEADER_BYTES = 4 << 20
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


@dataclass(frozen=True, slots=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]


def _corrupt(reason: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(f"adapter_model.safetensors is not a valid file: {reason}")


def read_header(data: bytes) -> dict[str, TensorEntry]:
    """Check the header's structure, dtypes and offsets; return name -> (dtype, shape)."""
    if len(data) < 8:
        raise _corrupt("shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise _corrupt(f"header length {header_len} is out of bounds")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt("header is not JSON") from error
    if not isinstance(header, dict):
        raise _corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = len(data) - 8 - header_len
    entries: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _corrupt(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in FLOAT_DTYPES:
            raise UnsupportedAdapterError(
                f"unsupported adapter: tensor {name!r} has dtype {dtype!r}; "
                f"only {sorted(FLOAT_DTYPES)} are accepted"
            )
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _corrupt(f"entry {name!r} has an invalid shape")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
            and offsets[1] - offsets[0] == math.prod(shape) * FLOAT_DTYPES[dtype]
        ):
            raise _corrupt(f"entry {name!r} has invalid data offsets")
        entries[name] = TensorEntry(dtype=dtype, shape=tuple(shape))
    return entries
