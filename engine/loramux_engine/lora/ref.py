"""How the platform names an adapter to the engine, and how its sha256 is defined.

An adapter is two files, ``adapter_config.json`` and ``adapter_model.safetensors``. Its
sha256 is::

    sha256( sha256(config_bytes).digest() + sha256(weights_bytes).digest() ).hexdigest()

i.e. the hex sha256 of the 64 raw bytes made of the two files' own sha256 digests,
config first. The platform computes it at upload with :func:`adapter_sha256` (each file
may be hashed while it streams); the engine checks it after every fetch.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def adapter_sha256(config_bytes: bytes, weights_bytes: bytes) -> str:
    return combine_file_digests(
        hashlib.sha256(config_bytes).digest(), hashlib.sha256(weights_bytes).digest()
    )


def combine_file_digests(config_digest: bytes, weights_digest: bytes) -> str:
    """The adapter sha256 from the two files' raw sha256 digests (for streamed hashing)."""
    return hashlib.sha256(config_digest + weights_digest).hexdigest()


MAX_NAMESPACE_CHARS = 256


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """An immutable adapter version: an opaque id, the sha256 of its content, a namespace.

    The namespace is opaque to the engine (the platform passes the tenant's id). Every
    cache tier is keyed by ``cache_key``, derived from (namespace, sha256), so identical
    bytes uploaded under two namespaces are two cache entries: one namespace's load is
    never a warm hit for another (which would tell it what the other has in use), and
    dropping one never evicts the other's.
    """

    id: str
    sha256: str
    namespace: str = ""

    def __post_init__(self) -> None:
        # The sha256 names the source's blobs, so it must never be a path.
        if not _SHA256_HEX.fullmatch(self.sha256):
            raise ValueError("AdapterRef.sha256 must be 64 lowercase hex characters")
        if not self.id:
            raise ValueError("AdapterRef.id must not be empty")
        if not isinstance(self.namespace, str) or len(self.namespace) > MAX_NAMESPACE_CHARS:
            raise ValueError(
                f"AdapterRef.namespace must be a string of at most {MAX_NAMESPACE_CHARS} chars"
            )

    @property
    def cache_key(self) -> str:
        """64 hex characters naming this (namespace, content) in every cache tier.

        A hash, never the namespace itself, so no input ever becomes part of a path. The
        empty namespace keys by the sha256 alone (as caches written before namespaces).
        """
        if not self.namespace:
            return self.sha256
        namespace = self.namespace.encode("utf-8", "surrogatepass")
        return hashlib.sha256(
            b"loramux-adapter-cache\0%d:%s\0%s" % (len(namespace), namespace, self.sha256.encode())
        ).hexdigest()
