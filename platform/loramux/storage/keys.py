"""Storage keys: validation and the content-addressed layout.

Keys are built by the platform, never taken from a request, but every backend
validates them anyway so a bug upstream cannot address a path outside the store.
"""

from __future__ import annotations

import re

from loramux.storage.errors import InvalidKey

MAX_KEY_LENGTH = 512
# Segments may not start with a dot: no ".", "..", or hidden files, and the local
# backend keeps its temp files in a dot-directory no key can name.
_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"
_KEY_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
_PREFIX_RE = re.compile(rf"(?:{_SEGMENT}/)*[A-Za-z0-9._-]*")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def validate_key(key: str) -> str:
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"invalid storage key (type or length): {key!r:.80}")
    if ".." in key or not _KEY_RE.fullmatch(key):
        raise InvalidKey(
            f"invalid storage key {key!r}: use [A-Za-z0-9._-] segments separated by '/', "
            "no leading '/', no '..', no segment starting with '.'"
        )
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: a key's leading part, possibly empty or ending with '/'."""
    if len(prefix) > MAX_KEY_LENGTH or ".." in prefix or not _PREFIX_RE.fullmatch(prefix):
        raise InvalidKey(f"invalid storage prefix {prefix!r}")
    return prefix


def validate_sha256(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
        raise ValueError(f"not a lowercase hex sha256: {sha256!r:.80}")
    return sha256


def content_key(kind: str, sha256: str, filename: str) -> str:
    """``<kind>/<sha256>/<filename>``: the path holds no tenant or user-chosen name."""
    return validate_key(f"{kind}/{validate_sha256(sha256)}/{filename}")


def adapter_key(sha256: str, filename: str) -> str:
    return content_key("adapters", sha256, filename)


def file_key(file_id: str) -> str:
    return validate_key(f"files/{file_id}")
