"""Whether a batch may still run lines: its tenant active, its key neither revoked nor expired.

The same rule as an online request's (``key_refusal``), applied to a batch that outlives the
request that created it. The runner checks it before each line is admitted to the engine and
again, under a share lock, in the transaction that stages a billable line: an administrator's
suspension or revocation then waits for a staging transaction already in flight and every
later one sees it, so no line is admitted after a check saw the change and none is billed
after the change committed.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loramux.auth.backend import key_refusal
from loramux.db.models import ApiKey, Tenant
from loramux.errors import APIError, AuthenticationFailed, PermissionDenied


class StandingRevoked(Exception):
    """The batch's tenant was suspended or its key revoked or expired: stop admitting lines.

    Not an APIError, so no handler that turns a line's APIError into its result swallows it.
    """

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


def check_standing(
    session: Session, tenant_id: str, api_key_id: str | None, *, lock: bool = False
) -> None:
    """Raise StandingRevoked unless the tenant and the batch's key may still be used."""
    tenants = select(Tenant).where(Tenant.id == tenant_id)
    keys = select(ApiKey).where(ApiKey.id == api_key_id, ApiKey.tenant_id == tenant_id)
    if lock:  # FOR SHARE: concurrent stagings do not block each other, an update waits
        tenants, keys = tenants.with_for_update(read=True), keys.with_for_update(read=True)
    tenant = session.scalars(tenants).one_or_none()
    if tenant is None:
        raise StandingRevoked(PermissionDenied("This tenant no longer exists.", code="tenant_gone"))
    key = None
    if api_key_id is not None:
        key = session.scalars(keys).one_or_none()
        if key is None:  # a key row removed outright is as good as revoked
            raise StandingRevoked(
                AuthenticationFailed("This API key has been revoked.", code="revoked_api_key")
            )
    refused = key_refusal(key, tenant, datetime.now(UTC))
    if refused is not None:
        raise StandingRevoked(refused)


def check_standing_now(
    sessions: sessionmaker[Session], tenant_id: str, api_key_id: str | None
) -> None:
    with sessions() as session:
        check_standing(session, tenant_id, api_key_id)
