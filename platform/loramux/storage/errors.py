"""One small hierarchy of storage errors; the API maps each kind to HTTP once.

Messages never name the endpoint, the bucket, a path or a key: they may reach a tenant
(a 503, an adapter that could not be loaded). The details go to the server's log where
the failure happens, and stay on the exception's attributes.
"""

from __future__ import annotations


class StorageError(Exception):
    """The store failed or is misconfigured (unreachable, denied, bad URL)."""


class StorageUnavailable(StorageError):
    """The store did not do what was asked, in time: down, hung, refusing or out of space.

    The request may be retried later (a 503 with ``Retry-After``).
    """


class InvalidKey(StorageError, ValueError):
    """A key outside the allowed alphabet or shape; never reaches the store."""


class BlobNotFound(StorageError, KeyError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return "blob not found"


class ChecksumMismatch(StorageError):
    """Data offered to ``put`` does not match the sha256 the caller declared."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch: expected {expected}, got {actual}")
        self.key, self.expected, self.actual = key, expected, actual


class BlobCorruptError(StorageError):
    """A stored blob no longer matches its sha256: it is never handed out."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(f"a stored blob is corrupt: expected sha256 {expected}, got {actual}")
        self.key, self.expected, self.actual = key, expected, actual


class PresignNotSupported(StorageError):
    """The backend cannot hand out URLs (a local directory); upload through the API."""
