"""Any S3-compatible store (AWS, MinIO, R2, Ceph) through boto3.

Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
profiles, instance roles). Objects larger than one part go up as a multipart upload
that is completed only after the whole stream hashed right, and aborted otherwise,
so a failed or rejected put never leaves an object or a dangling upload behind; a
process killed mid-upload leaves one that ``remove_partial_uploads`` aborts later.

Every call is bounded: a connect timeout, a read timeout on every socket read (a stalled
transfer fails, a long one does not), a few attempts, and no new attempt once a call has
run ``deadline_s``. A store that is down or hung costs a request seconds, not minutes.

Presigned URLs go to clients, which may reach the store at another address than the server
does (compose: the server at ``http://minio:9000``, a client at the host's published port).
The signature covers the host, so a URL cannot be rewritten after signing: with
``public_endpoint_url`` URLs are signed by a client configured for that endpoint (signing
makes no request), while every call the server makes goes to ``endpoint_url``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import IO, TYPE_CHECKING, Any, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from loramux.storage.base import BlobInfo, RawStream, Storage, as_stream, check_declared, read_exact
from loramux.storage.errors import BlobNotFound, StorageUnavailable
from loramux.storage.keys import validate_key, validate_prefix, validate_sha256

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's floor for every part but the last
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DEADLINE = "loramux_deadline"


class DeadlineExceeded(BotoCoreError):
    """No retry starts once a call has run its deadline (not retryable itself)."""

    fmt = "no further attempt: the call's deadline of {deadline_s} s has passed"


@contextlib.contextmanager
def _s3_errors(key: str | None = None) -> Iterator[None]:
    """Map botocore's errors to ours; the details (endpoint, bucket, key) only to the log."""
    try:
        yield
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if key is not None and code in _NOT_FOUND:
            raise BlobNotFound(key) from None
        log.warning("S3 request failed (key %s): %s", key, error)
        raise StorageUnavailable(
            f"object storage refused the request ({code or 'unknown'})"
        ) from error
    except BotoCoreError as error:
        log.warning("S3 unreachable (key %s): %s", key, error)
        raise StorageUnavailable(f"object storage is unreachable ({type(error).__name__})") from (
            error
        )


class _Body:
    """A get_object body whose network errors surface as StorageError."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def read(self, size: int = -1, /) -> bytes:
        with _s3_errors():
            return bytes(self._body.read(size))

    def close(self) -> None:
        self._body.close()


class S3Storage(Storage):
    supports_presign = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str = "us-east-1",
        addressing_style: Literal["auto", "virtual", "path"] = "path",
        part_size: int = 8 * 1024 * 1024,
        max_attempts: int = 3,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 3.0,
        deadline_s: float = 5.0,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = f"{validate_key(prefix)}/" if prefix else ""
        self.part_size = part_size
        self.deadline_s = deadline_s
        config = Config(
            region_name=region,
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            # Newer botocore adds CRC32 checksums by default; MinIO, R2, Ceph and older
            # stores reject or mishandle them. Integrity is our sha256 on every read.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A private session: boto3's default session is not safe to share across threads.
        session = boto3.session.Session()
        self.client: S3Client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self.client.meta.events.register("before-send.s3", self._check_deadline)
        # Signs the URLs handed to clients; it never sends a request.
        self.presign_client: S3Client = (
            session.client("s3", endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url
            else self.client
        )

    def _check_deadline(self, request: Any, **_: Any) -> None:
        """Before each attempt: start the call's clock, or stop retrying past its deadline."""
        context = request.context
        now = time.monotonic()
        if context.get("retries", {}).get("attempt", 1) <= 1 or _DEADLINE not in context:
            context[_DEADLINE] = now + self.deadline_s
        elif now >= context[_DEADLINE]:
            raise DeadlineExceeded(deadline_s=self.deadline_s)

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def object_key(self, key: str) -> str:
        """The key as the bucket sees it, below this store's prefix."""
        return self.prefix + validate_key(key)

    def put(self, key: str, data: bytes | IO[bytes], *, sha256: str | None = None) -> BlobInfo:
        object_key = self.object_key(key)
        if sha256 is not None:
            validate_sha256(sha256)
        stream = as_stream(data)
        first = read_exact(stream, self.part_size)
        second = read_exact(stream, self.part_size) if len(first) == self.part_size else b""
        if not second:
            digest = hashlib.sha256(first).hexdigest()
            check_declared(key, sha256, digest)
            with _s3_errors():
                self.client.put_object(Bucket=self.bucket, Key=object_key, Body=first)
            return BlobInfo(key, len(first), digest)
        rest = iter(lambda: read_exact(stream, self.part_size), b"")
        return self._put_multipart(key, itertools.chain((first, second), rest), sha256)

    def _put_multipart(self, key: str, parts: Iterator[bytes], sha256: str | None) -> BlobInfo:
        object_key = self.object_key(key)
        with _s3_errors():
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=object_key)[
                "UploadId"
            ]
        hasher, size, done = hashlib.sha256(), 0, []
        try:
            with _s3_errors():
                for number, part in enumerate(parts, start=1):
                    hasher.update(part)
                    size += len(part)
                    etag = self.client.upload_part(
                        Bucket=self.bucket,
                        Key=object_key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=part,
                    )["ETag"]
                    done.append({"ETag": etag, "PartNumber": number})
                check_declared(key, sha256, hasher.hexdigest())
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=object_key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": done},  # type: ignore[typeddict-item]
                )
        except BaseException:
            with contextlib.suppress(BotoCoreError, ClientError):
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=object_key, UploadId=upload_id
                )
            raise
        return BlobInfo(key, size, hasher.hexdigest())

    def _open_raw(self, key: str) -> RawStream:
        with _s3_errors(key):
            response = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
        return _Body(response["Body"])

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except BlobNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        with _s3_errors(key):
            head = self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        return int(head["ContentLength"])

    def delete(self, key: str) -> None:
        with _s3_errors():
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        return self._list(self.prefix + validate_prefix(prefix))

    def _list(self, full_prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        with _s3_errors():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    yield item["Key"][len(self.prefix) :]

    def presign_put(self, key: str, expires_s: int, content_length: int | None = None) -> str:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.object_key(key)}
        if content_length is not None:
            params["ContentLength"] = content_length
        with _s3_errors():
            return self.presign_client.generate_presigned_url(
                "put_object", params, ExpiresIn=expires_s
            )

    def presign_get(self, key: str, expires_s: int) -> str:
        params = {"Bucket": self.bucket, "Key": self.object_key(key)}
        with _s3_errors():
            return self.presign_client.generate_presigned_url(
                "get_object", params, ExpiresIn=expires_s
            )

    def check(self) -> None:
        with _s3_errors():
            self.client.head_bucket(Bucket=self.bucket)

    def remove_partial_uploads(self, older_than_s: float) -> int:
        """Abort multipart uploads under this prefix idle for over ``older_than_s``.

        Idle since their last part, or since they began if no part came: an upload still
        sending parts is in flight however long ago it began.
        """
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        paginator = self.client.get_paginator("list_multipart_uploads")
        aborted = 0
        with _s3_errors():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for upload in page.get("Uploads", []):
                    key, upload_id = upload["Key"], upload["UploadId"]
                    if upload["Initiated"] > cutoff or self._last_part_at(key, upload_id) > cutoff:
                        continue
                    with contextlib.suppress(ClientError):  # finished or aborted meanwhile
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=key, UploadId=upload_id
                        )
                        aborted += 1
        return aborted

    def _last_part_at(self, key: str, upload_id: str) -> datetime:
        latest = datetime.min.replace(tzinfo=UTC)
        paginator = self.client.get_paginator("list_parts")
        with contextlib.suppress(ClientError):  # finished or aborted meanwhile
            for page in paginator.paginate(Bucket=self.bucket, Key=key, UploadId=upload_id):
                for part in page.get("Parts", []):
                    latest = max(latest, part["LastModified"])
        return latest
