"""The bounded safetensors header reader (the engine's, used at upload): structure, memory."""

from __future__ import annotations

import io
import struct
import tracemalloc
from pathlib import Path

import pytest

from loramux_engine.lora.errors import UnsupportedAdapterError
from loramux_engine.lora.safetensors_header import MAX_HEADER_BYTES, read_header_stream
from tests.platform.adapters.crafted import CRAFTED, entry, safetensors_bytes
from tests.platform.adapters.helpers import WEIGHTS

MAX_TENSORS = 56


def _read(data: bytes, max_tensors: int = MAX_TENSORS) -> int:
    return len(read_header_stream(io.BytesIO(data), len(data), max_tensors=max_tensors))


def _reason(data: bytes, max_tensors: int = MAX_TENSORS) -> str:
    with pytest.raises(UnsupportedAdapterError) as caught:
        _read(data, max_tensors)
    return str(caught.value)


def test_a_peft_adapter_header_is_accepted(peft_adapter_dir: Path) -> None:
    assert _read((peft_adapter_dir / WEIGHTS).read_bytes()) == 2 * 3 * 4


def test_structure_problems_each_have_a_reason() -> None:
    gap = safetensors_bytes({"a": entry("F32", [1], 4, 8)}, b"\0" * 8)
    assert "4 unused bytes" in _reason(gap)
    trailing = safetensors_bytes({"a": entry("F32", [1], 0, 4)}, b"\0" * 8)
    assert "4 bytes after the last tensor" in _reason(trailing)
    outside = safetensors_bytes({"a": entry("F32", [1], 8, 12)}, b"\0" * 8)
    assert "outside" in _reason(outside)
    wrong_span = safetensors_bytes({"a": entry("F32", [2], 0, 4)}, b"\0" * 8)
    assert "spans 4 bytes" in _reason(wrong_span)
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{}}'
    duplicate = struct.pack("<Q", len(raw)) + raw + b"\0" * 4
    assert "appears twice" in _reason(duplicate)
    metadata = safetensors_bytes({"__metadata__": {"k": 1}}, b"")
    assert "__metadata__" in _reason(metadata)
    extra_key = safetensors_bytes({"a": {**entry("F32", [1], 0, 4), "x": 1}}, b"\0" * 4)
    assert "exactly dtype, shape and data_offsets" in _reason(extra_key)
    assert "only 3 bytes" in _reason(b"abc")


def test_more_tensors_than_the_base_model_allows_is_refused() -> None:
    many = {f"t{i}": entry("F16", [1], 2 * i, 2 * i + 2) for i in range(MAX_TENSORS + 1)}
    assert f"at most {MAX_TENSORS}" in _reason(safetensors_bytes(many, b"\0" * 2 * len(many)))


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_files_are_refused_reading_at_most_the_header_cap(kind: str) -> None:
    make, needle = CRAFTED[kind]
    data = make()
    tracemalloc.start()
    try:
        assert needle in _reason(data, max_tensors=1792)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The header cap plus parsing overhead, whatever the file claims or holds.
    assert peak < 8 * MAX_HEADER_BYTES


def test_tensor_data_is_never_read(tmp_path: Path) -> None:
    """A 256 MiB file (sparse on disk): only the header is read."""
    size = 64 << 20
    header = safetensors_bytes({"w": entry("F32", [size], 0, 4 * size)}, b"")
    path = tmp_path / WEIGHTS
    with path.open("wb") as out:
        out.write(header)
        out.truncate(len(header) + 4 * size)
    tracemalloc.start()
    try:
        with path.open("rb") as stream:
            parsed = read_header_stream(stream, path.stat().st_size, max_tensors=1)
            assert stream.tell() == len(header)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parsed["w"].shape == (size,) and peak < 1 << 20
