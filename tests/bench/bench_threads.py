"""32 threads doing short transactions against a pool of at most 8 connections.

Each transaction: BEGIN; SELECT an account by primary key; UPDATE the thread's own counter
row (``n = n + 1``); COMMIT.  One op is one transaction, so the rate is transactions per
second; each run spreads its ops evenly over the threads.

=================  ========================================================================
contender          pool and transaction
=================  ========================================================================
dbkit              ``Database`` with max_open_conns=8, max_idle_conns=8;
                   ``with db.transaction() as conn``
sqlalchemy         ``create_engine(pool_size=8, max_overflow=0)``; ``with engine.begin()``
psycopg_pool       ``ConnectionPool(min_size=8, max_size=8)``;
                   ``with pool.connection() as c, c.transaction()``
=================  ========================================================================

dataset sits this one out: its ``Database.executable`` checks a connection out of the pool
while holding the database-wide lock, and a thread ending its ``with db:`` needs that lock
to give its connection back.  With more threads than connections, the thread waiting for
the pool blocks every holder until ``pool_timeout`` (30 s) fails it, one waiter after
another: 32 threads x 5 transactions on 8 connections had not finished after 5 minutes,
even with ``pool_timeout=3``.

A transaction that raises is counted, not retried; the first few errors are printed.
After each run (untimed) the counters must have grown by exactly the number of
transactions that did not raise: a lost or doubled update is an error too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import sqlalchemy as sa
from psycopg_pool import ConnectionPool

from .context import Context, libpq_url
from .harness import Contender, Goal, Runner, Workload
from .schema import ACCOUNTS, accounts, count, counters, seed_accounts

POOL = 8
by_id = sa.select(accounts.c.balance).where(accounts.c.id == sa.bindparam("id"))
bump = sa.update(counters).where(counters.c.id == sa.bindparam("cid")).values(n=counters.c.n + 1)
RAW_BY_ID = "SELECT balance FROM bench_accounts WHERE id = %s"
RAW_BUMP = "UPDATE bench_counters SET n = n + 1 WHERE id = %s"

# One transaction of thread `thread`, its `k`-th.
Transaction = Callable[[int, int], None]


def _account(thread: int, k: int) -> int:
    return (thread * 31 + k) % ACCOUNTS


def _threaded(tx: Transaction, threads: int, errors: list[str]) -> Runner:
    def run(n: int) -> None:
        per_thread = max(1, n // threads)

        def worker(thread: int) -> None:
            for k in range(per_thread):
                try:
                    tx(thread, k)
                except Exception as error:  # counted and shown, never retried
                    errors.append(f"thread {thread}: {type(error).__name__}: {error}")

        workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    return run


def threaded(ctx: Context) -> Workload:
    threads, per_thread = ctx.sizes.threads, ctx.sizes.tx_per_thread
    seed_accounts(ctx.url, threads)
    db = ctx.dbkit(pool=POOL)
    engine = ctx.engine(pool=POOL, max_overflow=0)
    pool = ConnectionPool(libpq_url(ctx.url), min_size=POOL, max_size=POOL, open=True)
    ctx.stack.callback(pool.close)
    pool.wait()
    admin = ctx.admin()

    def dbkit(thread: int, k: int) -> None:
        with db.transaction() as conn:
            conn.execute(by_id, {"id": _account(thread, k)}).one()
            conn.execute(bump, {"cid": thread})

    def sqlalchemy(thread: int, k: int) -> None:
        with engine.begin() as conn:
            conn.execute(by_id, {"id": _account(thread, k)}).one()
            conn.execute(bump, {"cid": thread})

    def pg(thread: int, k: int) -> None:
        with pool.connection() as conn, conn.transaction():
            conn.execute(RAW_BY_ID, (_account(thread, k),)).fetchone()
            conn.execute(RAW_BUMP, (thread,))

    transactions: dict[str, Transaction] = {
        "dbkit": dbkit,
        "sqlalchemy": sqlalchemy,
        "psycopg_pool": pg,
    }
    contenders: dict[str, Contender] = {}
    for name, tx in transactions.items():
        errors: list[str] = []
        contenders[name] = Contender(_threaded(tx, threads, errors), errors=errors)

    ops = threads * per_thread
    before: dict[str, tuple[int, int]] = {}  # contender -> (counter total, errors so far)

    def total() -> int:
        return count(admin, "SELECT coalesce(sum(n), 0) FROM bench_counters")

    def reset(name: str) -> None:
        before[name] = (total(), len(contenders[name].errors))

    def verify(name: str) -> list[str]:
        counted, errors = before[name]
        expected = ops - (len(contenders[name].errors) - errors)
        grown = total() - counted
        if grown == expected:
            return []
        return [f"counters grew by {grown:,}, expected {expected:,} committed transactions"]

    return Workload(
        "threads",
        f"{threads} threads x {per_thread} short transactions, pool of {POOL} connections",
        ops,
        contenders,
        unit="tx",
        baselines={"psycopg": "psycopg_pool", "sqlalchemy": "sqlalchemy"},
        goal=Goal("dbkit", "psycopg_pool", "rate", 0.9, no_errors=True),
        warmup_ops=threads * 2,
        reset=reset,
        verify=verify,
    )
