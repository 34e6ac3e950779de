"""What only the S3 backend has: client settings, multipart clean-up, error mapping."""

from __future__ import annotations

import hashlib
import io
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from loramux.settings import Settings
from loramux.storage import ChecksumMismatch, S3Storage, StorageError, storage_from_settings
from tests.fixtures.s3 import TEST_PART_SIZE


class FailingStream(io.RawIOBase):
    """Yields ``good`` bytes, then fails as a dropped client connection would."""

    def __init__(self, good: int) -> None:
        self.remaining = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.remaining <= 0:
            raise ConnectionResetError("client went away")
        n = min(len(buffer), self.remaining)
        buffer[:n] = b"\x01" * n
        self.remaining -= n
        return n


def assert_nothing_left(storage: S3Storage, key: str) -> None:
    assert not storage.exists(key)
    uploads = storage.client.list_multipart_uploads(Bucket=storage.bucket)
    assert uploads.get("Uploads", []) == []


def test_client_settings_for_s3_compatible_stores(s3_storage: S3Storage) -> None:
    config = s3_storage.client.meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.s3 == {"addressing_style": "path"}
    assert config.signature_version == "s3v4"
    assert config.retries == {"total_max_attempts": 3, "mode": "standard"}
    assert (config.connect_timeout, config.read_timeout) == (2.0, 3.0)


def test_requests_carry_no_crc_checksums(s3_storage: S3Storage) -> None:
    sent: list[dict[str, str]] = []
    s3_storage.client.meta.events.register(
        "before-send.s3", lambda request, **_: sent.append(dict(request.headers))
    )
    s3_storage.put("files/small", b"x")
    s3_storage.put("files/large", b"y" * (TEST_PART_SIZE + 1))
    assert len(sent) == 1 + 4  # put_object; then create, two parts, complete
    for headers in sent:
        assert not any(name.lower().startswith("x-amz-checksum") for name in headers)
        assert "x-amz-sdk-checksum-algorithm" not in {name.lower() for name in headers}


def test_presigned_urls_are_path_style(s3_storage: S3Storage, s3_endpoint: str) -> None:
    url = urlsplit(s3_storage.presign_get("files/a", 60))
    assert f"{url.scheme}://{url.netloc}" == s3_endpoint
    assert url.path == f"/{s3_storage.bucket}/blobs/files/a"


def test_failed_stream_aborts_the_multipart_upload(s3_storage: S3Storage) -> None:
    with pytest.raises(ConnectionResetError):
        s3_storage.put("files/broken", io.BufferedReader(FailingStream(3 * TEST_PART_SIZE)))
    assert_nothing_left(s3_storage, "files/broken")


def test_wrong_sha_on_multipart_aborts(s3_storage: S3Storage) -> None:
    data = b"z" * (2 * TEST_PART_SIZE + 7)
    with pytest.raises(ChecksumMismatch):
        s3_storage.put("files/big", data, sha256=hashlib.sha256(b"other").hexdigest())
    assert_nothing_left(s3_storage, "files/big")


def test_prefix_isolates_stores(s3_storage: S3Storage, s3_endpoint: str) -> None:
    other = S3Storage(s3_storage.bucket, "other", endpoint_url=s3_endpoint)
    s3_storage.put("files/a", b"a")
    other.put("files/b", b"b")
    assert list(s3_storage.list()) == ["files/a"]
    assert list(other.list()) == ["files/b"]


def test_part_size_below_s3_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3Storage("bucket", part_size=1024)


def test_missing_bucket_and_unreachable_endpoint_fail_check(s3_endpoint: str) -> None:
    with pytest.raises(StorageError):
        S3Storage("no-such-bucket-here", endpoint_url=s3_endpoint).check()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    down = S3Storage("bucket", endpoint_url=closed, max_attempts=1, connect_timeout_s=1)
    with pytest.raises(StorageError, match="unreachable"):
        down.check()
    with pytest.raises(StorageError):
        down.put("files/a", b"a")


def test_list_follows_pages(s3_storage: S3Storage) -> None:
    pages = []

    def small_pages(params: dict[str, Any], **_: Any) -> None:
        params["MaxKeys"] = 2
        pages.append(params.get("ContinuationToken"))

    s3_storage.client.meta.events.register("before-parameter-build.s3.ListObjectsV2", small_pages)
    keys = [f"files/{i}" for i in range(5)]
    for key in keys:
        s3_storage.put(key, b"x")
    assert list(s3_storage.list("files/")) == keys
    assert len(pages) == 3 and pages[0] is None and all(pages[1:])


def test_presigned_urls_name_the_public_endpoint_and_work_through_it(
    s3_endpoint: str, s3_bucket: str
) -> None:
    """The server talks to LORAMUX_S3_ENDPOINT_URL; URLs for clients are signed for
    LORAMUX_S3_PUBLIC_ENDPOINT_URL (the signature covers the host, so it cannot be rewritten).

    The public name here is compose's default, ``localhost`` (MinIO's port published on the
    host), another host than the server's endpoint. A client that maps it back to the store
    (a published port, a hosts entry) connects to the store's address with the Host the URL
    names: the host the signature covers.
    """
    server = urlsplit(s3_endpoint)
    public = f"localhost:{server.port}"
    settings = Settings(
        storage_url=f"s3://{s3_bucket}/blobs",
        s3_endpoint_url=s3_endpoint,
        s3_public_endpoint_url=f"http://{public}",
    )
    storage = storage_from_settings(settings)
    assert isinstance(storage, S3Storage)
    storage.put("files/from-server", b"the server's own calls")
    assert storage.client.meta.endpoint_url == s3_endpoint  # the server's calls: not public

    def mapped_back(url: str) -> tuple[str, dict[str, str]]:
        parts = urlsplit(url)
        assert parts.netloc == public
        return parts._replace(netloc=server.netloc).geturl(), {"Host": parts.netloc}

    body = b"weights from outside"
    url, headers = mapped_back(storage.presign_put("files/from-client", 60, len(body)))
    assert httpx.put(url, content=body, headers=headers, timeout=10).status_code == 200
    assert storage.get_bytes("files/from-client", expected_sha256=None) == body
    url, headers = mapped_back(storage.presign_get("files/from-server", 60))
    fetched = httpx.get(url, headers=headers, timeout=10)
    assert fetched.status_code == 200 and fetched.content == b"the server's own calls"


def test_without_a_public_endpoint_urls_name_the_servers_endpoint(
    s3_endpoint: str, s3_bucket: str
) -> None:
    storage = storage_from_settings(
        Settings(storage_url=f"s3://{s3_bucket}", s3_endpoint_url=s3_endpoint)
    )
    url = urlsplit(storage.presign_put("files/a", 60))
    assert f"{url.scheme}://{url.netloc}" == s3_endpoint
