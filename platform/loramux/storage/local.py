"""A local directory with the same content-addressed layout as the S3 store."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from loramux.storage.base import (
    CHUNK_SIZE,
    BlobInfo,
    RawStream,
    Storage,
    as_stream,
    check_declared,
)
from loramux.storage.errors import BlobNotFound, PresignNotSupported, StorageUnavailable
from loramux.storage.keys import validate_key, validate_prefix, validate_sha256

log = logging.getLogger(__name__)

# No key segment may start with ".", so temp files here never show up as blobs.
TMP_DIR = ".tmp"
NOT_WRITABLE = "is not writable"
NO_PRESIGN = (
    "presigned URLs need an S3-compatible store (LORAMUX_STORAGE_URL=s3://...); "
    "the local directory backend transfers blobs through the API only"
)


class LocalStorage(Storage):
    """Blobs as files under ``root``; writes go to a temp file, then an atomic rename.

    Presigned URLs are impossible without a server in front of the directory:
    ``presign_put`` / ``presign_get`` raise ``PresignNotSupported``, and the API
    offers only direct uploads for this backend (``supports_presign`` is False).
    """

    supports_presign = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put(self, key: str, data: bytes | IO[bytes], *, sha256: str | None = None) -> BlobInfo:
        path = self._path(key)
        if sha256 is not None:
            validate_sha256(sha256)
        tmp_dir = self.root / TMP_DIR
        tmp = tmp_dir / uuid.uuid4().hex
        hasher, size, stream = hashlib.sha256(), 0, as_stream(data)
        try:
            # Only the directory's own failures are "unavailable"; the source's go as they are.
            with _unavailable(NOT_WRITABLE):
                tmp_dir.mkdir(parents=True, exist_ok=True)
                out = tmp.open("wb")
            with out:
                for chunk in iter(lambda: stream.read(CHUNK_SIZE), b""):
                    hasher.update(chunk)
                    size += len(chunk)
                    with _unavailable(NOT_WRITABLE):
                        out.write(chunk)
                with _unavailable(NOT_WRITABLE):
                    out.flush()
                    os.fsync(out.fileno())
            check_declared(key, sha256, hasher.hexdigest())
            with _unavailable(NOT_WRITABLE):
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return BlobInfo(key, size, hasher.hexdigest())

    def _open_raw(self, key: str) -> RawStream:
        try:
            return self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        return path.stat().st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        # Walk only the deepest directory the prefix names, then filter by string prefix.
        base = self.root / prefix.rpartition("/")[0]
        if not base.is_dir():
            return iter(())
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix) and not name.startswith("."):
                    keys.append(key)
        return iter(sorted(keys))

    def presign_put(self, key: str, expires_s: int, content_length: int | None = None) -> str:
        raise PresignNotSupported(NO_PRESIGN)

    def presign_get(self, key: str, expires_s: int) -> str:
        raise PresignNotSupported(NO_PRESIGN)

    def check(self) -> None:
        with _unavailable(NOT_WRITABLE):
            tmp_dir = self.root / TMP_DIR
            tmp_dir.mkdir(parents=True, exist_ok=True)
            probe = tmp_dir / f"probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()

    def remove_partial_uploads(self, older_than_s: float) -> int:
        """Temp files under ``.tmp/`` (a put killed before its rename) older than that."""
        cutoff = time.time() - older_than_s
        removed = 0
        tmp_dir = self.root / TMP_DIR
        with _unavailable("cannot be listed"):
            entries = list(os.scandir(tmp_dir)) if tmp_dir.is_dir() else []
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):  # finished or removed meanwhile
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    """A failing directory (full, read-only, gone) is unavailable storage; its path is
    logged here and never put in the message, which may reach a tenant."""
    try:
        yield
    except (BlobNotFound, StorageUnavailable):
        raise
    except OSError as error:
        log.warning("storage directory: %s: %s", what, error)
        reason = os.strerror(error.errno) if error.errno else type(error).__name__
        raise StorageUnavailable(f"the storage directory {what} ({reason})") from error
