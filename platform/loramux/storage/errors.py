"""One small hierarchy of storage errors; the API maps each kind to HTTP once."""

from __future__ import annotations


class StorageError(Exception):
    """The store failed or is misconfigured (unreachable, denied, bad URL)."""


class InvalidKey(StorageError, ValueError):
    """A key outside the allowed alphabet or shape; never reaches the store."""


class BlobNotFound(StorageError, KeyError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"blob not found: {self.key}"


class ChecksumMismatch(StorageError):
    """Data offered to ``put`` does not match the sha256 the caller declared."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch for {key}: expected {expected}, got {actual}")
        self.key, self.expected, self.actual = key, expected, actual


class BlobCorruptError(StorageError):
    """A stored blob no longer matches its sha256: it is never handed out."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(f"blob {key} is corrupt: expected sha256 {expected}, got {actual}")
        self.key, self.expected, self.actual = key, expected, actual


class PresignNotSupported(StorageError):
    """The backend cannot hand out URLs (a local directory); upload through the API."""
