"""Key layout and building the configured store from settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from loramux.settings import Settings
from loramux.storage import (
    InvalidKey,
    LocalStorage,
    S3Storage,
    StorageError,
    adapter_key,
    content_key,
    file_key,
    storage_from_settings,
    validate_key,
)

SHA = "ab" * 32


def test_content_keys() -> None:
    key = adapter_key(SHA, "adapter_model.safetensors")
    assert key == f"adapters/{SHA}/adapter_model.safetensors"
    assert content_key("exports", SHA, "out.jsonl") == f"exports/{SHA}/out.jsonl"
    assert file_key("file-123") == "files/file-123"
    assert validate_key("a/B-1_2.x/c") == "a/B-1_2.x/c"


@pytest.mark.parametrize("sha", ["AB" * 32, "ab" * 31, "../" + "a" * 61, ""])
def test_content_key_needs_a_real_sha256(sha: str) -> None:
    with pytest.raises(ValueError):
        adapter_key(sha, "adapter_model.safetensors")


def test_file_key_refuses_path_characters() -> None:
    with pytest.raises(InvalidKey):
        file_key("../secrets")


def test_embedded_default_is_a_directory_under_home(tmp_path: Path) -> None:
    storage = storage_from_settings(Settings(home=tmp_path, storage_url=None))
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path / "storage"


def test_file_url(tmp_path: Path) -> None:
    storage = storage_from_settings(Settings(storage_url=(tmp_path / "blobs").as_uri()))
    assert isinstance(storage, LocalStorage) and storage.root == tmp_path / "blobs"


def test_s3_url_uses_endpoint_and_region() -> None:
    settings = Settings(
        storage_url="s3://my-bucket/lora/blobs/",
        s3_endpoint_url="http://minio:9000",
        s3_region="eu-west-3",
    )
    storage = storage_from_settings(settings)
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix) == ("my-bucket", "lora/blobs/")
    assert storage.client.meta.endpoint_url == "http://minio:9000"
    assert storage.client.meta.region_name == "eu-west-3"


@pytest.mark.parametrize(
    "url", ["gs://bucket/x", "s3:///no-bucket", "file://otherhost/x", "/plain/path", "s3://b/x?y=1"]
)
def test_unsupported_urls_are_clear_errors(url: str) -> None:
    with pytest.raises(StorageError, match="LORAMUX_STORAGE_URL"):
        storage_from_settings(Settings(storage_url=url))
