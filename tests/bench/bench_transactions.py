"""Per-query overhead: a primary-key read outside a transaction (``db.execute`` and
``repo.get``), one read inside a transaction, and a nested savepoint block, on the 1,000
rows of ``bench_accounts``.

=============  =============================  =========================  ===================
workload       psycopg                        SQLAlchemy Core            dataset
=============  =============================  =========================  ===================
point read     autocommit conn.execute        engine.connect() + one     table.find_one(id=)
one read/tx    with conn.transaction()        with engine.begin()        with db: find_one
savepoint      conn.transaction() nested      conn.begin_nested()        (no savepoints)
get            autocommit conn.execute        engine.connect() + one     table.find_one(id=)
=============  =============================  =========================  ===================

dataset keeps one connection per thread and lets SQLAlchemy autobegin on it: its reads
outside ``with db:`` run in one long implicit transaction (no BEGIN/COMMIT per read), and
``with db:`` returns that connection to the pool when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from dbkit.repository import Repository

from .context import Context
from .harness import Contender, Goal, Workload
from .schema import ACCOUNTS, accounts, seed_accounts

by_id = sa.select(accounts.c.balance).where(accounts.c.id == sa.bindparam("id"))
RAW_BY_ID = "SELECT balance FROM bench_accounts WHERE id = %s"


@dataclass
class Account:
    id: int
    balance: int


class Accounts(Repository[Account]):
    table = accounts
    model = Account


def point_read(ctx: Context) -> Workload:
    seed_accounts(ctx.url)
    db, engine, raw = ctx.dbkit(), ctx.engine(), ctx.raw(autocommit=True)

    def dbkit(n: int) -> None:
        for i in range(n):
            db.execute(by_id, {"id": i % ACCOUNTS}).one()

    def sqlalchemy(n: int) -> None:
        for i in range(n):
            with engine.connect() as conn:
                conn.execute(by_id, {"id": i % ACCOUNTS}).one()

    def pg(n: int) -> None:
        for i in range(n):
            raw.execute(RAW_BY_ID, (i % ACCOUNTS,)).fetchone()

    contenders = {"dbkit": dbkit, "sqlalchemy": sqlalchemy, "psycopg": pg}
    return Workload(
        "point",
        "point read by primary key, outside a transaction",
        ctx.sizes.point_ops,
        {name: Contender(run) for name, run in contenders.items()} | _dataset_find_one(ctx),
        goal=Goal("dbkit", "psycopg", "time", 1.5),
    )


def get(ctx: Context) -> Workload:
    seed_accounts(ctx.url)
    db, engine, raw = ctx.dbkit(), ctx.engine(), ctx.raw(autocommit=True)
    repo = Accounts(db)
    select = sa.select(accounts).where(accounts.c.id == sa.bindparam("id"))
    raw_sql = "SELECT id, balance FROM bench_accounts WHERE id = %s"

    def dbkit(n: int) -> None:
        for i in range(n):
            repo.get(i % ACCOUNTS)

    def sqlalchemy(n: int) -> None:
        for i in range(n):
            with engine.connect() as conn:
                conn.execute(select, {"id": i % ACCOUNTS}).one()

    def pg(n: int) -> None:
        for i in range(n):
            raw.execute(raw_sql, (i % ACCOUNTS,)).fetchone()

    contenders = {"dbkit repo.get": dbkit, "sqlalchemy": sqlalchemy, "psycopg": pg}
    return Workload(
        "get",
        "repository get by primary key (whole row), outside a transaction",
        ctx.sizes.point_ops,
        {name: Contender(run) for name, run in contenders.items()} | _dataset_find_one(ctx),
        goal=Goal("dbkit repo.get", "psycopg", "time", 1.5),
    )


def _dataset_find_one(ctx: Context) -> dict[str, Contender]:
    ds = ctx.dataset()
    if ds is None:
        return {}
    table = ds.load_table("bench_accounts")

    def run(n: int) -> None:
        for i in range(n):
            table.find_one(id=i % ACCOUNTS)

    return {"dataset find_one": Contender(run)}


def read_in_transaction(ctx: Context) -> Workload:
    seed_accounts(ctx.url)
    db, engine, raw = ctx.dbkit(), ctx.engine(), ctx.raw(autocommit=True)

    def dbkit(n: int) -> None:
        for i in range(n):
            with db.transaction() as conn:
                conn.execute(by_id, {"id": i % ACCOUNTS}).one()

    def sqlalchemy(n: int) -> None:
        for i in range(n):
            with engine.begin() as conn:
                conn.execute(by_id, {"id": i % ACCOUNTS}).one()

    def pg(n: int) -> None:
        for i in range(n):
            with raw.transaction():
                raw.execute(RAW_BY_ID, (i % ACCOUNTS,)).fetchone()

    contenders = {"dbkit": dbkit, "sqlalchemy": sqlalchemy, "psycopg": pg}
    ds = ctx.dataset()
    if ds is not None:
        table = ds.load_table("bench_accounts")

        def dataset_tx(n: int) -> None:
            for i in range(n):
                with ds:
                    table.find_one(id=i % ACCOUNTS)

        contenders["dataset"] = dataset_tx
    return Workload(
        "tx-read",
        "one read inside a transaction (BEGIN; SELECT by pk; COMMIT)",
        ctx.sizes.point_ops,
        {name: Contender(run) for name, run in contenders.items()},
        goal=Goal("dbkit", "sqlalchemy", "time", 1.0),
    )


credit = (
    sa.update(accounts)
    .where(accounts.c.id == sa.bindparam("key"))
    .values(balance=accounts.c.balance + sa.bindparam("amount"))
)
RAW_CREDIT = "UPDATE bench_accounts SET balance = balance + %s WHERE id = %s"


def write_in_transaction(ctx: Context) -> Workload:
    """A transfer: two UPDATEs by primary key in one transaction.  dbkit also learns the
    transaction's id before COMMIT (to resolve a lost COMMIT): this is what that costs."""
    seed_accounts(ctx.url)
    db, engine, raw = ctx.dbkit(), ctx.engine(), ctx.raw(autocommit=True)

    def dbkit(n: int) -> None:
        for i in range(n):
            with db.transaction() as conn:
                conn.execute(credit, {"key": i % ACCOUNTS, "amount": -1})
                conn.execute(credit, {"key": (i + 1) % ACCOUNTS, "amount": 1})

    def sqlalchemy(n: int) -> None:
        for i in range(n):
            with engine.begin() as conn:
                conn.execute(credit, {"key": i % ACCOUNTS, "amount": -1})
                conn.execute(credit, {"key": (i + 1) % ACCOUNTS, "amount": 1})

    def pg(n: int) -> None:
        for i in range(n):
            with raw.transaction():
                raw.execute(RAW_CREDIT, (-1, i % ACCOUNTS))
                raw.execute(RAW_CREDIT, (1, (i + 1) % ACCOUNTS))

    contenders = {"dbkit": dbkit, "sqlalchemy": sqlalchemy, "psycopg": pg}
    return Workload(
        "tx-write",
        "a transfer: two UPDATEs by pk in one transaction (BEGIN; UPDATE; UPDATE; COMMIT)",
        ctx.sizes.point_ops,
        {name: Contender(run) for name, run in contenders.items()},
        goal=Goal("dbkit", "sqlalchemy", "time", 1.0),
    )


def savepoint(ctx: Context) -> Workload:
    """Inside one open transaction, each op is a nested block (SAVEPOINT; SELECT; RELEASE).
    dataset has no savepoints (a nested ``with db:`` only counts depth), so it sits out."""
    seed_accounts(ctx.url)
    db, engine, raw = ctx.dbkit(), ctx.engine(), ctx.raw(autocommit=True)

    def dbkit(n: int) -> None:
        with db.transaction():
            for i in range(n):
                with db.transaction() as conn:
                    conn.execute(by_id, {"id": i % ACCOUNTS}).one()

    def sqlalchemy(n: int) -> None:
        with engine.begin() as conn:
            for i in range(n):
                with conn.begin_nested():
                    conn.execute(by_id, {"id": i % ACCOUNTS}).one()

    def pg(n: int) -> None:
        with raw.transaction():
            for i in range(n):
                with raw.transaction():
                    raw.execute(RAW_BY_ID, (i % ACCOUNTS,)).fetchone()

    contenders = {"dbkit": dbkit, "sqlalchemy": sqlalchemy, "psycopg": pg}
    return Workload(
        "savepoint",
        "nested savepoint block (one read) inside an open transaction",
        ctx.sizes.point_ops,
        {name: Contender(run) for name, run in contenders.items()},
    )
