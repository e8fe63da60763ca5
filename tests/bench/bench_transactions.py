"""Transaction overhead: one primary-key read inside a transaction, and a nested savepoint
block, for dbkit, plain SQLAlchemy Core and raw psycopg on the same table and data."""

from __future__ import annotations

from contextlib import ExitStack

import psycopg
import sqlalchemy as sa

from dbkit import Database

from .harness import Workload

ROWS = 1000
metadata = sa.MetaData()
accounts = sa.Table(
    "bench_accounts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("balance", sa.Integer, nullable=False),
)
by_id = sa.select(accounts.c.balance).where(accounts.c.id == sa.bindparam("id"))
RAW_BY_ID = "SELECT balance FROM bench_accounts WHERE id = %s"


def setup(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        metadata.drop_all(conn)
        metadata.create_all(conn)
        conn.execute(accounts.insert(), [{"id": i, "balance": 100} for i in range(ROWS)])
    engine.dispose()


def workloads(url: str, stack: ExitStack) -> list[Workload]:
    setup(url)
    db = stack.enter_context(Database.from_url(url, max_open_conns=4, max_idle_conns=4))
    engine = sa.create_engine(url, pool_size=4)
    stack.callback(engine.dispose)
    raw = stack.enter_context(
        psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True)
    )

    def dbkit_read(n: int) -> None:
        for i in range(n):
            with db.transaction() as conn:
                conn.execute(by_id, {"id": i % ROWS}).one()

    def sa_read(n: int) -> None:
        for i in range(n):
            with engine.begin() as conn:
                conn.execute(by_id, {"id": i % ROWS}).one()

    def pg_read(n: int) -> None:
        for i in range(n):
            with raw.transaction():
                raw.execute(RAW_BY_ID, (i % ROWS,)).fetchone()

    def dbkit_nested(n: int) -> None:
        with db.transaction():
            for i in range(n):
                with db.transaction() as conn:
                    conn.execute(by_id, {"id": i % ROWS}).one()

    def sa_nested(n: int) -> None:
        with engine.begin() as conn:
            for i in range(n):
                with conn.begin_nested():
                    conn.execute(by_id, {"id": i % ROWS}).one()

    def pg_nested(n: int) -> None:
        with raw.transaction():
            for i in range(n):
                with raw.transaction():
                    raw.execute(RAW_BY_ID, (i % ROWS,)).fetchone()

    def dbkit_point(n: int) -> None:
        for i in range(n):
            db.execute(by_id, {"id": i % ROWS}).one()

    def sa_point(n: int) -> None:
        for i in range(n):
            with engine.connect() as conn:
                conn.execute(by_id, {"id": i % ROWS}).one()

    def pg_point(n: int) -> None:
        for i in range(n):
            raw.execute(RAW_BY_ID, (i % ROWS,)).fetchone()

    return [
        Workload(
            "one read in a transaction",
            2000,
            {"dbkit": dbkit_read, "sqlalchemy": sa_read, "psycopg": pg_read},
        ),
        Workload(
            "nested savepoint block (one read)",
            2000,
            {"dbkit": dbkit_nested, "sqlalchemy": sa_nested, "psycopg": pg_nested},
        ),
        Workload(
            "point read outside a transaction",
            2000,
            {"dbkit": dbkit_point, "sqlalchemy": sa_point, "psycopg": pg_point},
        ),
    ]
