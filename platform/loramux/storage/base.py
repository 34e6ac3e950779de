"""The storage interface, shared by the local-directory and S3 backends.

Reads are verified: ``get_bytes`` and ``download_to`` check the sha256 before the
caller sees any data, and ``open`` returns a reader whose final read raises
``BlobCorruptError`` instead of signalling a clean end of stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from loramux.storage.errors import BlobCorruptError, ChecksumMismatch
from loramux.storage.keys import validate_key, validate_sha256

CHUNK_SIZE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class BlobInfo:
    key: str
    size: int
    sha256: str


class RawStream(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...
    def close(self) -> None: ...


def as_stream(data: bytes | IO[bytes]) -> IO[bytes]:
    return io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data


def read_exact(stream: IO[bytes], size: int) -> bytes:
    """Up to ``size`` bytes, fewer only at end of stream (``read`` may return short)."""
    parts, remaining = [], size
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def check_declared(key: str, declared: str | None, actual: str) -> None:
    if declared is not None and declared != actual:
        raise ChecksumMismatch(key, declared, actual)


class BlobReader:
    """A blob's bytes, hashed as they are read.

    Bytes returned before the end are not yet verified; the read that reaches the
    end raises ``BlobCorruptError`` on a mismatch. Consume to ``b""`` (or use
    ``get_bytes`` / ``download_to``) before trusting the content.
    """

    def __init__(self, key: str, raw: RawStream, expected_sha256: str | None) -> None:
        self.key = key
        self._raw = raw
        self._expected = expected_sha256
        self._hasher = hashlib.sha256()
        self.size = 0
        self.complete = False

    @property
    def verified(self) -> bool:
        """True once the whole blob was read and matched ``expected_sha256``."""
        return self.complete and self._expected is not None

    @property
    def sha256(self) -> str:
        """The hash of the bytes read so far; the blob's own once ``complete``."""
        return self._hasher.hexdigest()

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(CHUNK_SIZE), b""))
        chunk = self._raw.read(size) if size else b""
        if chunk:
            self._hasher.update(chunk)
            self.size += len(chunk)
        elif size and not self.complete:
            actual = self._hasher.hexdigest()
            if self._expected is not None and actual != self._expected:
                raise BlobCorruptError(self.key, self._expected, actual)
            self.complete = True
        return chunk

    def __iter__(self) -> Iterator[bytes]:
        return iter(lambda: self.read(CHUNK_SIZE), b"")

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Storage(ABC):
    """Content-addressed blob storage. Keys are validated by every operation."""

    supports_presign: bool = False

    @abstractmethod
    def put(self, key: str, data: bytes | IO[bytes], *, sha256: str | None = None) -> BlobInfo:
        """Store ``data`` streaming; if ``sha256`` is given and differs, store nothing and
        raise ``ChecksumMismatch``. Replaces an existing blob atomically."""

    @abstractmethod
    def _open_raw(self, key: str) -> RawStream:
        """The stored bytes, unverified; raises ``BlobNotFound``."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a blob; deleting a missing blob is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, in lexicographic order."""

    @abstractmethod
    def presign_put(self, key: str, expires_s: int, content_length: int | None = None) -> str:
        """A URL a client can PUT the blob to; ``PresignNotSupported`` if impossible."""

    @abstractmethod
    def presign_get(self, key: str, expires_s: int) -> str: ...

    @abstractmethod
    def check(self) -> None:
        """Raise ``StorageError`` unless the store is reachable and writable (/readyz)."""

    @abstractmethod
    def remove_partial_uploads(self, older_than_s: float) -> int:
        """Remove what puts left half-done (a process killed mid-write) over ``older_than_s``
        seconds ago; the number removed. Younger ones may still be in flight."""

    def open(self, key: str, *, expected_sha256: str | None) -> BlobReader:
        """Stream a blob; pass ``expected_sha256=None`` only where no hash is known."""
        validate_key(key)
        if expected_sha256 is not None:
            validate_sha256(expected_sha256)
        return BlobReader(key, self._open_raw(key), expected_sha256)

    def get_bytes(self, key: str, *, expected_sha256: str | None) -> bytes:
        with self.open(key, expected_sha256=expected_sha256) as reader:
            return reader.read()

    def download_to(self, key: str, path: Path, *, expected_sha256: str | None) -> BlobInfo:
        """Write the blob to ``path`` only once verified: a corrupt blob leaves no file."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        try:
            with self.open(key, expected_sha256=expected_sha256) as reader, tmp.open("wb") as out:
                for chunk in reader:
                    out.write(chunk)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return BlobInfo(key, reader.size, reader.sha256)
