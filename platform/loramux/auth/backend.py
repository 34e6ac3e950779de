"""Starlette authentication backend for ``Authorization: Bearer lmx_...`` keys.

Every request reads the key row and its tenant, so a revocation or a suspension takes
effect on the very next request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
)
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from loramux.auth.keys import hash_secret, looks_like_key, secrets_match
from loramux.db.models import ApiKey, Tenant
from loramux.errors import (
    APIError,
    AuthenticationFailed,
    PermissionDenied,
    dependency_unavailable,
)

LAST_USED_RESOLUTION = timedelta(minutes=1)
BOOTSTRAP_ADMIN_ID = "bootstrap-admin"


@dataclass(frozen=True, slots=True)
class Principal(BaseUser):
    key_id: str
    scopes: frozenset[str]
    tenant_id: str | None = None
    tenant_name: str | None = None

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.tenant_name or "admin"

    @property
    def actor(self) -> str:
        return f"tenant:{self.tenant_id}" if self.tenant_id else f"admin:{self.key_id}"

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise PermissionDenied(f"this API key lacks the {scope!r} scope")


class KeyRejected(AuthenticationError):
    """Carries the API error through Starlette's middleware, which only catches this type."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


class ApiKeyBackend(AuthenticationBackend):
    def __init__(self, sessions: sessionmaker[Session], admin_key: str | None) -> None:
        self.sessions = sessions
        self.admin_key = admin_key

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        try:
            return await self._authenticate(conn)
        except APIError as error:
            raise KeyRejected(error) from error
        except Exception as error:
            # Here, outside the routes' error mapping: a registry outage is still a 503.
            unavailable = dependency_unavailable(error)
            if unavailable is None:
                raise
            raise KeyRejected(unavailable) from error

    async def _authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        header = conn.headers.get("authorization")
        if header is None:
            return None  # public routes stay public; protected ones answer 401
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not looks_like_key(secret):
            raise AuthenticationFailed("Incorrect API key provided.")
        if self.admin_key and secrets_match(secret, self.admin_key):
            principal = Principal(key_id=BOOTSTRAP_ADMIN_ID, scopes=frozenset({"admin"}))
        else:
            principal = await run_in_threadpool(self._lookup, secret)
        return AuthCredentials(sorted(principal.scopes)), principal

    def _lookup(self, secret: str) -> Principal:
        digest = hash_secret(secret)
        now = datetime.now(UTC)
        with self.sessions() as session:
            row = session.execute(
                select(ApiKey, Tenant)
                .outerjoin(Tenant, Tenant.id == ApiKey.tenant_id)
                .where(ApiKey.secret_sha256 == digest)
            ).first()
            # The index lookup already matched the digest; compare again in constant time
            # so no code path depends on how much of a guess was right.
            if row is None or not secrets_match(row.ApiKey.secret_sha256, digest):
                raise AuthenticationFailed("Incorrect API key provided.")
            key, tenant = row.ApiKey, row.Tenant
            refused = key_refusal(key, tenant, now)
            if refused is not None:
                raise refused
            if key.last_used_at is None or key.last_used_at < now - LAST_USED_RESOLUTION:
                session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
                session.commit()
            return Principal(
                key_id=key.id,
                scopes=frozenset(key.scopes),
                tenant_id=tenant.id if tenant else None,
                tenant_name=tenant.name if tenant else None,
            )


def key_refusal(key: ApiKey | None, tenant: Tenant | None, now: datetime) -> APIError | None:
    """Why a key may not be used now (revoked, expired, its tenant suspended), or None.

    The one rule for an online request and for a running batch's next line.
    """
    if key is not None and key.revoked_at is not None:
        return AuthenticationFailed("This API key has been revoked.", code="revoked_api_key")
    if key is not None and key.expires_at is not None and key.expires_at <= now:
        return AuthenticationFailed("This API key has expired.", code="expired_api_key")
    if tenant is not None and tenant.status != "active":
        return PermissionDenied(
            "This tenant is suspended; contact your administrator.", code="tenant_suspended"
        )
    return None


def on_auth_error(_conn: HTTPConnection, exc: Exception) -> JSONResponse:
    if isinstance(exc, KeyRejected):
        return exc.error.response()
    return AuthenticationFailed(str(exc)).response()
