"""The same Alembic migrations run on PostgreSQL and SQLite and match the models."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from loramux.db.migrate import downgrade, upgrade
from loramux.db.models import Base
from loramux.db.session import make_engine

TABLES = {t.name for t in Base.metadata.sorted_tables}


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    return diff


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    names = set(inspect(engine).get_table_names()) - {"alembic_version"}
    engine.dispose()
    return names


def test_postgres_upgrade_downgrade_upgrade(pg_database: str) -> None:
    upgrade(pg_database)
    assert _tables(pg_database) == TABLES
    assert _diff(pg_database) == []
    downgrade(pg_database, "base")
    assert _tables(pg_database) == set()
    upgrade(pg_database)
    assert _tables(pg_database) == TABLES
    assert _diff(pg_database) == []


def test_sqlite_upgrade_downgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    assert _tables(url) == TABLES
    assert _diff(url) == []
    downgrade(url, "base")
    assert _tables(url) == set()
