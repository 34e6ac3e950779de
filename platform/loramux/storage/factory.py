"""Build the configured store from ``LORAMUX_STORAGE_URL``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from loramux.settings import Settings
from loramux.storage.base import Storage
from loramux.storage.errors import StorageError
from loramux.storage.local import LocalStorage
from loramux.storage.s3 import S3Storage


def storage_from_settings(settings: Settings) -> Storage:
    """``file:///path`` -> LocalStorage; ``s3://bucket/prefix`` -> S3Storage."""
    url = settings.resolved_storage_url
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise StorageError(f"LORAMUX_STORAGE_URL {url!r}: use file:///absolute/path")
        return LocalStorage(Path(url2pathname(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc or parts.query or parts.fragment:
            raise StorageError(f"LORAMUX_STORAGE_URL {url!r}: use s3://bucket[/prefix]")
        return S3Storage(
            parts.netloc,
            parts.path.strip("/"),
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url,
            region=settings.s3_region,
            max_attempts=settings.s3_max_attempts,
            connect_timeout_s=settings.s3_connect_timeout_s,
            read_timeout_s=settings.s3_read_timeout_s,
            deadline_s=settings.s3_deadline_s,
        )
    raise StorageError(
        f"LORAMUX_STORAGE_URL {url!r}: unsupported scheme {parts.scheme!r} "
        "(expected file:///path or s3://bucket/prefix)"
    )
