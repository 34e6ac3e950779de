"""Content-addressed blob storage: a local directory or any S3-compatible store."""

from __future__ import annotations

from loramux.storage.base import BlobInfo, BlobReader, Storage
from loramux.storage.errors import (
    BlobCorruptError,
    BlobNotFound,
    ChecksumMismatch,
    InvalidKey,
    PresignNotSupported,
    StorageError,
    StorageUnavailable,
)
from loramux.storage.factory import storage_from_settings
from loramux.storage.keys import adapter_key, content_key, file_key, validate_key
from loramux.storage.local import LocalStorage
from loramux.storage.s3 import S3Storage

__all__ = [
    "BlobCorruptError",
    "BlobInfo",
    "BlobNotFound",
    "BlobReader",
    "ChecksumMismatch",
    "InvalidKey",
    "LocalStorage",
    "PresignNotSupported",
    "S3Storage",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "adapter_key",
    "content_key",
    "file_key",
    "storage_from_settings",
    "validate_key",
]
