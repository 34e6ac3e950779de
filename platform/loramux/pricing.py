"""The operator's price table: per base model, per million input and output tokens; per
GB-month of adapter storage; a discount on batch traffic.

It lives in the registry (``price_tables``), edited through ``PUT /admin/api/prices`` (and
the console), so a change needs no restart and reaches every API replica and worker at
once. Each edit is a new version in force from its ``effective_at``; older versions stay,
so usage is always priced by the table in force when it ran.

Amounts are integer micro-dollars (1 USD = 1,000,000); the API shows them as decimal USD
strings. A price per million tokens of ``0.15`` USD is 150,000 micro-dollars, 0.15 of a
micro-dollar per token: costs are exact fractions until a statement line rounds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from loramux.audit import record
from loramux.db.models import PriceTable
from loramux.errors import InvalidRequest

MICRO = 1_000_000
DEFAULT_MODEL = "*"  # the row for any base model the table does not name
MAX_MODELS = 100
MAX_USD = Decimal(1_000_000)
TABLE_FIELDS = {"models", "storage_per_gb_month", "batch_discount_percent"}
MODEL_FIELDS = {"input_per_million_tokens", "output_per_million_tokens"}


@dataclass(frozen=True, slots=True)
class ModelPrice:
    input_per_mtok: int = 0  # micro-dollars per million input (prompt) tokens
    output_per_mtok: int = 0  # micro-dollars per million output (completion) tokens


@dataclass(frozen=True, slots=True)
class Prices:
    models: dict[str, ModelPrice] = field(default_factory=dict)
    storage_per_gb_month: int = 0  # micro-dollars per 10^9 bytes stored for a month
    batch_discount_bp: int = 0  # basis points off batch traffic (5000: half price)

    def for_model(self, base_model_id: str | None) -> ModelPrice:
        price = self.models.get(base_model_id or "") or self.models.get(DEFAULT_MODEL)
        return price or ModelPrice()

    def usage_cost(
        self, base_model_id: str | None, prompt_tokens: int, completion_tokens: int, batch: bool
    ) -> Fraction:
        """Micro-dollars, exact."""
        price = self.for_model(base_model_id)
        cost = Fraction(
            prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok,
            MICRO,
        )
        if batch:
            cost *= Fraction(10_000 - self.batch_discount_bp, 10_000)
        return cost

    def to_json(self) -> dict[str, Any]:
        """The stored form: integers only."""
        return {
            "models": {
                name: {"input_per_mtok": p.input_per_mtok, "output_per_mtok": p.output_per_mtok}
                for name, p in self.models.items()
            },
            "storage_per_gb_month": self.storage_per_gb_month,
            "batch_discount_bp": self.batch_discount_bp,
        }

    @classmethod
    def from_json(cls, stored: dict[str, Any]) -> Prices:
        return cls(
            models={
                name: ModelPrice(int(p["input_per_mtok"]), int(p["output_per_mtok"]))
                for name, p in stored.get("models", {}).items()
            },
            storage_per_gb_month=int(stored.get("storage_per_gb_month", 0)),
            batch_discount_bp=int(stored.get("batch_discount_bp", 0)),
        )


def usd(micro: int) -> str:
    """Integer micro-dollars as a decimal USD string: 1500000 -> '1.500000'."""
    sign = "-" if micro < 0 else ""
    whole, part = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{part:06d}"


def round_micro(value: Fraction) -> int:
    """Exact micro-dollars to whole ones, halves up (costs are never negative)."""
    return int((value + Fraction(1, 2)) // 1)


def _amount(value: Any, param: str, *, places: int, limit: Decimal = MAX_USD) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidRequest(f'{param} must be a decimal number such as "0.15"', param=param)
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidRequest(
            f'{param} must be a decimal number such as "0.15"', param=param
        ) from None
    if not amount.is_finite() or amount < 0 or amount > limit:
        raise InvalidRequest(f"{param} must be between 0 and {limit}", param=param)
    if amount != amount.quantize(Decimal(1).scaleb(-places)):
        raise InvalidRequest(f"{param} has more than {places} decimal places", param=param)
    return amount


def parse_prices(body: dict[str, Any]) -> Prices:
    """A price table from the API's JSON (USD decimals); every refusal names its field."""
    unknown = sorted(set(body) - TABLE_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", param=unknown[0])
    models_in = body.get("models", {})
    if not isinstance(models_in, dict) or len(models_in) > MAX_MODELS:
        raise InvalidRequest(
            f"models must be an object of at most {MAX_MODELS} base models", param="models"
        )
    models: dict[str, ModelPrice] = {}
    for name, prices in models_in.items():
        where = f"models.{name}"
        if not 1 <= len(name) <= 128:
            raise InvalidRequest("a base model id has 1 to 128 characters", param="models")
        if not isinstance(prices, dict) or set(prices) - MODEL_FIELDS:
            raise InvalidRequest(
                f"{where} must hold input_per_million_tokens and output_per_million_tokens",
                param=where,
            )
        models[name] = ModelPrice(
            *(
                int(_amount(prices.get(f, 0), f"{where}.{f}", places=6) * MICRO)
                for f in ("input_per_million_tokens", "output_per_million_tokens")
            )
        )
    storage = _amount(body.get("storage_per_gb_month", 0), "storage_per_gb_month", places=6)
    discount = _amount(
        body.get("batch_discount_percent", 0),
        "batch_discount_percent",
        places=2,
        limit=Decimal(100),
    )
    return Prices(models, int(storage * MICRO), int(discount * 100))


def prices_view(prices: Prices) -> dict[str, Any]:
    """The API's JSON: USD decimal strings; ``parse_prices`` reads it back unchanged."""
    return {
        "models": {
            name: {
                "input_per_million_tokens": usd(p.input_per_mtok),
                "output_per_million_tokens": usd(p.output_per_mtok),
            }
            for name, p in sorted(prices.models.items())
        },
        "storage_per_gb_month": usd(prices.storage_per_gb_month),
        "batch_discount_percent": f"{prices.batch_discount_bp // 100}."
        f"{prices.batch_discount_bp % 100:02d}",
    }


def table_view(row: PriceTable | None) -> dict[str, Any]:
    prices = Prices() if row is None else Prices.from_json(row.prices)
    return {
        "object": "price_table",
        "id": None if row is None else row.id,
        "currency": "USD",
        **prices_view(prices),
        "effective_at": None if row is None else int(row.effective_at.timestamp()),
        "created_by": None if row is None else row.created_by,
    }


def current_table(session: Session) -> PriceTable | None:
    return session.scalars(
        select(PriceTable).order_by(PriceTable.effective_at.desc(), PriceTable.id.desc()).limit(1)
    ).first()


def set_prices(session: Session, prices: Prices, *, actor: str) -> PriceTable:
    row = PriceTable(prices=prices.to_json(), created_by=actor)
    session.add(row)
    session.flush()
    record(
        session,
        actor=actor,
        action="prices.update",
        target_type="price_table",
        target_id=str(row.id),
        tenant_id=None,
        details=prices_view(prices),
    )
    return row


@dataclass(frozen=True, slots=True)
class PricePeriod:
    start: datetime
    end: datetime
    prices: Prices


def price_periods(session: Session, start: datetime, end: datetime) -> list[PricePeriod]:
    """[start, end) cut where the table changes; before the first table everything is free."""
    rows = session.execute(
        select(PriceTable.effective_at, PriceTable.prices).order_by(
            PriceTable.effective_at, PriceTable.id
        )
    ).all()
    periods: list[PricePeriod] = []
    cursor, prices = start, Prices()
    for effective_at, stored in rows:
        if effective_at >= end:
            break
        if effective_at > cursor:
            periods.append(PricePeriod(cursor, effective_at, prices))
            cursor = effective_at
        prices = Prices.from_json(stored)
    if cursor < end:
        periods.append(PricePeriod(cursor, end, prices))
    return periods
