"""API key material: ``lmx_`` plus 256 bits of randomness, stored as prefix + sha256."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KEY_PREFIX = "lmx_"
DISPLAY_PREFIX_LEN = 12  # "lmx_" and 8 characters: enough to tell keys apart in a list

SCOPES = frozenset({"inference", "adapters:read", "adapters:write", "batches", "admin"})
TENANT_DEFAULT_SCOPES = ("inference", "adapters:read", "adapters:write", "batches")


@dataclass(frozen=True, slots=True)
class NewKey:
    secret: str
    prefix: str
    secret_sha256: str


def generate_key() -> NewKey:
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    return NewKey(secret, secret[:DISPLAY_PREFIX_LEN], hash_secret(secret))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secrets_match(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode(), expected.encode())


def looks_like_key(secret: str) -> bool:
    return secret.startswith(KEY_PREFIX) and 16 <= len(secret) <= 128


def invalid_scopes(scopes: list[str]) -> list[str]:
    return sorted(set(scopes) - SCOPES)
