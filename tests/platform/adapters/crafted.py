"""Hand-made weights files: hostile safetensors headers, pickles, and damaged adapters."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

# A protocol-4 pickle of an empty dict, written out so no test calls pickle.
PICKLE_BYTES = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94."


def safetensors_bytes(header: dict[str, Any], data: bytes, header_len: int | None = None) -> bytes:
    """A safetensors file from a raw header dict; ``header_len`` may lie about its length."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    length = len(raw) if header_len is None else header_len
    return struct.pack("<Q", length) + raw + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def truncated_data() -> bytes:
    """A tensor of 1024 floats whose data the file does not hold."""
    return safetensors_bytes({"w": entry("F32", [1024], 0, 4096)}, b"\0" * 100)


def header_longer_than_file() -> bytes:
    return safetensors_bytes({"w": entry("F32", [2], 0, 8)}, b"\0" * 8, header_len=100_000)


def overlapping_offsets() -> bytes:
    header = {"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 8, 24)}
    return safetensors_bytes(header, b"\0" * 24)


def unknown_dtype() -> bytes:
    return safetensors_bytes({"w": entry("Q7", [4], 0, 4)}, b"\0" * 4)


def huge_shape_product() -> bytes:
    return safetensors_bytes({"w": entry("F32", [1 << 40, 1 << 40], 0, 16)}, b"\0" * 16)


def many_tiny_tensors(count: int = 100_000) -> bytes:
    header = {f"t{i}": entry("F16", [1], 2 * i, 2 * i + 2) for i in range(count)}
    return safetensors_bytes(header, b"\0" * (2 * count))


def torch_bin() -> bytes:
    """What ``torch.save`` writes for a .bin: a zip holding a pickle."""
    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    return buffer.getvalue()


CRAFTED = {
    "truncated": (truncated_data, "the file holds 100 bytes"),
    "header_longer_than_file": (header_longer_than_file, "header claims 100000 bytes"),
    "overlap": (overlapping_offsets, "overlap"),
    "unknown_dtype": (unknown_dtype, "dtype 'Q7'"),
    "huge_shape": (huge_shape_product, "which needs"),
    "many_tiny_tensors": (many_tiny_tensors, "over the 1048576-byte limit"),
    "pickle": (lambda: PICKLE_BYTES, "not a safetensors file"),
    "torch_bin": (torch_bin, "not a safetensors file"),
}


def altered_weights(adapter_dir: Path, change: str) -> bytes:
    """The adapter's real weights with one well-formed but wrong change (checked by the task)."""
    import torch
    from safetensors.torch import load, save

    tensors = load((adapter_dir / "adapter_model.safetensors").read_bytes())
    name = sorted(tensors)[0]
    if change == "nan":
        tensors[name][0, 0] = float("nan")
    elif change == "inf":
        tensors[name][0, 0] = float("inf")
    elif change == "wrong_shape":
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    elif change == "extra_tensor":
        tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    elif change == "missing_tensor":
        del tensors[name]
    return save(tensors)
