"""Adapter identity: the sha256 definition the platform shares, and references."""

from __future__ import annotations

import hashlib

import pytest

from loramux_engine.lora.ref import AdapterRef, adapter_sha256, combine_file_digests


def test_adapter_sha256_definition() -> None:
    config, weights = b'{"r": 8}', b"weights"
    inner = hashlib.sha256(config).digest() + hashlib.sha256(weights).digest()
    assert adapter_sha256(config, weights) == hashlib.sha256(inner).hexdigest()
    streamed = combine_file_digests(
        hashlib.sha256(config).digest(), hashlib.sha256(weights).digest()
    )
    assert streamed == adapter_sha256(config, weights)
    assert adapter_sha256(weights, config) != adapter_sha256(config, weights)


@pytest.mark.parametrize("sha", ["../../etc", "A" * 64, "0" * 63, ""])
def test_ref_sha_must_be_hex(sha: str) -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        AdapterRef(id="x", sha256=sha)


def test_ref_is_hashable_and_needs_an_id() -> None:
    assert len({AdapterRef("a", "0" * 64), AdapterRef("a", "0" * 64)}) == 1
    with pytest.raises(ValueError, match="id"):
        AdapterRef(id="", sha256="0" * 64)
