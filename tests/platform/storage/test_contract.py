"""One contract, both backends: a local directory and S3 on moto's server over HTTP."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import httpx
import pytest

from loramux.storage import (
    BlobCorruptError,
    BlobNotFound,
    ChecksumMismatch,
    InvalidKey,
    LocalStorage,
    PresignNotSupported,
    S3Storage,
    Storage,
    adapter_key,
)
from tests.fixtures.s3 import TEST_PART_SIZE

DATA = b"lora weights " * 1000
SHA = hashlib.sha256(DATA).hexdigest()
KEY = adapter_key(SHA, "adapter_model.safetensors")
BAD_KEYS = ["", "/abs", "a/../b", "..", "a\\b", "a//b", "a/", ".hidden", "a/./b", "a b", "é"]


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    return request.getfixturevalue("s3_storage")


def corrupt(storage: Storage, key: str, data: bytes) -> None:
    """Replace a blob's bytes behind the backend's back."""
    if isinstance(storage, LocalStorage):
        (storage.root / key).write_bytes(data)
    else:
        assert isinstance(storage, S3Storage)
        storage.client.put_object(Bucket=storage.bucket, Key=storage.object_key(key), Body=data)


def etag(storage: S3Storage, key: str) -> str:
    head = storage.client.head_object(Bucket=storage.bucket, Key=storage.object_key(key))
    return head["ETag"].strip('"')


def test_round_trip(storage: Storage, tmp_path: Path) -> None:
    info = storage.put(KEY, DATA, sha256=SHA)
    assert (info.key, info.size, info.sha256) == (KEY, len(DATA), SHA)
    assert storage.exists(KEY) and storage.size(KEY) == len(DATA)
    assert storage.get_bytes(KEY, expected_sha256=SHA) == DATA
    with storage.open(KEY, expected_sha256=SHA) as reader:
        assert b"".join(reader) == DATA and reader.verified
    target = tmp_path / "out.safetensors"
    assert storage.download_to(KEY, target, expected_sha256=SHA) == info
    assert target.read_bytes() == DATA


def test_reader_verifies_only_at_end_of_stream(storage: Storage) -> None:
    storage.put(KEY, DATA)
    with storage.open(KEY, expected_sha256=SHA) as reader:
        head = reader.read(7)
        assert head == DATA[:7] and not reader.verified
        assert head + reader.read() == DATA and reader.verified
    with storage.open(KEY, expected_sha256=None) as reader:
        assert reader.read() == DATA and reader.complete and not reader.verified


def test_put_from_stream_and_overwrite(storage: Storage) -> None:
    storage.put("files/f1", io.BytesIO(b"first"))
    info = storage.put("files/f1", io.BytesIO(DATA))
    assert info.sha256 == SHA
    assert storage.get_bytes("files/f1", expected_sha256=SHA) == DATA


def test_corrupt_blob_is_never_returned(storage: Storage, tmp_path: Path) -> None:
    storage.put(KEY, DATA, sha256=SHA)
    corrupt(storage, KEY, DATA[:-1] + b"X")
    with pytest.raises(BlobCorruptError):
        storage.get_bytes(KEY, expected_sha256=SHA)
    with storage.open(KEY, expected_sha256=SHA) as reader, pytest.raises(BlobCorruptError):
        for _ in reader:
            pass
    assert not reader.verified
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BlobCorruptError):
        storage.download_to(KEY, out / "adapter_model.safetensors", expected_sha256=SHA)
    assert list(out.iterdir()) == []


def test_wrong_declared_sha_stores_nothing(storage: Storage) -> None:
    with pytest.raises(ChecksumMismatch):
        storage.put(KEY, DATA, sha256="0" * 64)
    assert not storage.exists(KEY)
    assert list(storage.list()) == []


def test_missing_blob(storage: Storage, tmp_path: Path) -> None:
    assert not storage.exists("files/nope")
    with pytest.raises(BlobNotFound):
        storage.size("files/nope")
    with pytest.raises(BlobNotFound):
        storage.get_bytes("files/nope", expected_sha256=None)
    with pytest.raises(BlobNotFound):
        storage.download_to("files/nope", tmp_path / "x", expected_sha256=None)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(InvalidKey):
        storage.put(key, b"x")
    with pytest.raises(InvalidKey):
        storage.get_bytes(key, expected_sha256=None)
    with pytest.raises(InvalidKey):
        storage.exists(key)
    with pytest.raises(InvalidKey):
        storage.delete(key)


def test_delete_is_idempotent(storage: Storage) -> None:
    storage.put("files/a", b"a")
    storage.delete("files/a")
    storage.delete("files/a")
    assert not storage.exists("files/a")


def test_list_with_prefix(storage: Storage) -> None:
    keys = ["adapters/aa/x", "adapters/ab/y", "adapters/b/z", "files/1", "files/2"]
    for key in reversed(keys):
        storage.put(key, key.encode())
    assert list(storage.list()) == keys
    assert list(storage.list("adapters/a")) == keys[:2]
    assert list(storage.list("files/")) == keys[3:]
    assert list(storage.list("nothing/")) == []
    with pytest.raises(InvalidKey):
        storage.list("../")


def test_large_upload_streams_in_parts(storage: Storage, tmp_path: Path) -> None:
    size = 4 * TEST_PART_SIZE + 12345
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(size))
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    with source.open("rb") as stream:
        info = storage.put("files/big", stream, sha256=sha)
    assert (info.size, info.sha256) == (size, sha)
    if isinstance(storage, S3Storage):
        assert etag(storage, "files/big").endswith("-5")
    target = tmp_path / "copy.bin"
    storage.download_to("files/big", target, expected_sha256=sha)
    assert target.read_bytes() == source.read_bytes()


def test_exactly_one_part_is_a_single_put(storage: Storage) -> None:
    data = os.urandom(TEST_PART_SIZE)
    info = storage.put("files/one", data)
    assert info.size == TEST_PART_SIZE
    if isinstance(storage, S3Storage):
        assert "-" not in etag(storage, "files/one")


def test_presign(storage: Storage) -> None:
    if not storage.supports_presign:
        with pytest.raises(PresignNotSupported, match="s3://"):
            storage.presign_put("files/up", 60)
        with pytest.raises(PresignNotSupported):
            storage.presign_get("files/up", 60)
        return
    put_url = storage.presign_put("files/up", 60, content_length=len(DATA))
    assert httpx.put(put_url, content=DATA).status_code == 200
    assert storage.get_bytes("files/up", expected_sha256=SHA) == DATA
    response = httpx.get(storage.presign_get("files/up", 60))
    assert response.status_code == 200 and response.content == DATA


def test_check(storage: Storage) -> None:
    storage.check()
