"""Read throughput with 0, 1 and 2 streaming replicas: 8 threads, each reading rows by
primary key, a pool of 8 connections per server.

The workload runs on servers of its own, also under ``--url`` (it needs a server it can
make replicas of): a throwaway primary (``LocalPostgres``) and two streaming hot standbys
of it (``start_replica()``: ``pg_basebackup -R``, each on its own port), all stopped once it
is measured.  Untimed setup: a table of ``replica_rows`` rows (10,000; ``--quick`` 1,000)
is filled and vacuumed on the primary, and the run waits until both replicas have replayed
the primary's WAL up to its current insert position.

=====================  ===================================================================
contender              each read, on which server
=====================  ===================================================================
psycopg_pool           ``ConnectionPool(min_size=8, max_size=8, autocommit)``; ``with
                       pool.connection() as c: c.execute(SELECT … WHERE id = %s)``;
                       the primary
sqlalchemy             ``create_engine(pool_size=8, max_overflow=0)``; ``with
                       engine.connect() as c: c.execute(select).one()``; the primary
dbkit, 0 replicas      ``Database.from_url(primary, max_open_conns=8)``; ``repo.get(id)``;
                       the primary
dbkit, 1 replica       ``from_url(primary, replicas=[r1], read_from="prefer-replica",
                       max_replica_lag=10)``; ``repo.get(id)``; replica 1
dbkit, 2 replicas      ``replicas=[r1, r2]``, the same; ``repo.get(id)``; the two replicas
                       in turn
dbkit tx, 0 replicas   ``with db.transaction(readonly=True) as c: c.execute(select).one()``
                       (BEGIN READ ONLY; SELECT; COMMIT); the primary
dbkit tx, 2 replicas   the same block on the 2-replica Database; the two replicas in turn
=====================  ===================================================================

One op is one read; each run spreads its ops evenly over the threads (bench_threads'
runner), and every thread reads the same sequence of ids in every contender (a fixed
stride over the whole table).
Every dbkit ``Database`` with replicas has its own pool of 8 on each replica (and on the
primary, which its reads here never need: this process writes nothing, so no read waits for
a replay).  A read that raises is counted, not retried.

Verification: the rows are read through a view that adds where the read ran
(``pg_is_in_recovery()``, ``inet_server_port()``), so after each run (untimed) every read
is accounted for: the right row, the expected server (the primary for the baselines and
``0 replicas``, replica 1 for ``1 replica``, both replicas for ``2 replicas``, each with at
least a quarter of the reads) and as many reads as ops that did not raise.  A contender
that silently falls back to the primary is an error, not a win.  The notes column shows
where the last round's reads went.

The limit, stated honestly: on the 2-CPU machine these numbers come from, the primary, the
replicas and the Python client share the same two cores, and the client (8 Python threads
under one GIL) needs about one of them by itself.  A replica therefore adds no capacity
here: its CPU is taken from the primary's and the client's.  What the workload shows is
what routing a read costs (``1 replica`` against ``0 replicas``), that reads spread over
the replicas, and that nothing is read from a server that should not answer it; not that
replicas scale reads, which needs servers on machines of their own.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg_pool import ConnectionPool

from dbkit import Database
from dbkit.local import LocalPostgres
from dbkit.repository import Repository

from .bench_threads import Transaction, _threaded
from .context import Context, libpq_url
from .harness import Contender, Goal, Workload

POOL = 8
# A bound for a loaded machine, never an expectation: replay is usually milliseconds.
REPLAY_WAIT = 60.0
# With two replicas, each must have served at least this share of a run's reads.
MIN_SHARE = 0.25

metadata = sa.MetaData()
# A view over bench_replica_rows that says which server answered each read.
reads = sa.Table(
    "bench_replica_reads",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("balance", sa.Integer, nullable=False),
    sa.Column("on_replica", sa.Boolean, nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
)
by_id = sa.select(reads).where(reads.c.id == sa.bindparam("id"))
RAW_BY_ID = "SELECT id, balance, on_replica, port FROM bench_replica_reads WHERE id = %s"
SETUP = (
    "DROP VIEW IF EXISTS bench_replica_reads",
    "DROP TABLE IF EXISTS bench_replica_rows",
    "CREATE TABLE bench_replica_rows (id int PRIMARY KEY, balance int NOT NULL)",
    "CREATE VIEW bench_replica_reads AS SELECT id, balance, "
    "pg_is_in_recovery() AS on_replica, inet_server_port() AS port FROM bench_replica_rows",
)


@dataclass
class Row:
    id: int
    balance: int
    on_replica: bool
    port: int


class Rows(Repository[Row]):
    table = reads
    model = Row


# One read: the row with this id, as (id, balance, on_replica, port).
Read = Callable[[int], tuple[Any, ...]]


def _balance(key: int) -> int:
    return key * 7 % 1000


def _key(thread: int, k: int, rows: int) -> int:
    """The k-th id thread `thread` reads: a stride prime to the table size, so the threads
    spread over the whole table."""
    return (thread * 7919 + k * 104_729) % rows


@dataclass
class Tally:
    """What one run of a contender read: per thread, (on_replica, port) -> reads (each
    thread counts in its own Counter), and the wrong rows."""

    seen: defaultdict[int, Counter[tuple[bool, int]]] = field(
        default_factory=lambda: defaultdict(Counter)
    )
    wrong: list[str] = field(default_factory=list)

    def clear(self) -> None:
        self.seen.clear()
        self.wrong.clear()

    def by_server(self) -> Counter[tuple[bool, int]]:
        return sum(self.seen.values(), Counter())


def _reading(read: Read, rows: int, tally: Tally) -> Transaction:
    """One read of the k-th id of thread `thread`, checked and counted; an error is left
    to bench_threads' runner, which counts it."""

    def tx(thread: int, k: int) -> None:
        key = _key(thread, k, rows)
        got, balance, on_replica, port = read(key)
        if got != key or balance != _balance(key):
            tally.wrong.append(f"id {key}: read ({got}, {balance})")
        tally.seen[thread][(bool(on_replica), int(port))] += 1

    return tx


def _seed(primary: LocalPostgres, rows: int) -> None:
    with primary.admin_connection() as conn:
        for sql in SETUP:
            conn.execute(sql)
        conn.execute(
            "INSERT INTO bench_replica_rows (id, balance) "
            "SELECT i, i * 7 %% 1000 FROM generate_series(0, %s) i",
            (rows - 1,),
        )
        conn.execute("VACUUM ANALYZE bench_replica_rows")


def _wait_replayed(primary: LocalPostgres, replicas: list[LocalPostgres]) -> None:
    """Until every replica has replayed all the primary has written (the seeded rows)."""
    with primary.admin_connection() as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    target = str(row[0])
    for replica in replicas:
        deadline = time.monotonic() + REPLAY_WAIT
        with replica.admin_connection() as conn:
            while True:
                done = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
                ).fetchone()
                if done is not None and done[0]:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{replica.url} did not replay up to {target} in {REPLAY_WAIT:g} s"
                    )
                time.sleep(0.05)


def replicas(ctx: Context) -> Workload:
    threads = ctx.sizes.replica_threads
    per_thread = ctx.sizes.replica_reads_per_thread
    rows = ctx.sizes.replica_rows
    primary = ctx.stack.enter_context(LocalPostgres())
    # Stopped by the primary's exit (replicas first), even when the second one fails.
    standbys = [primary.start_replica(), primary.start_replica()]
    _seed(primary, rows)
    _wait_replayed(primary, standbys)
    names = {primary.port: "primary"} | {r.port: f"replica {i}" for i, r in enumerate(standbys, 1)}

    def dbkit(on: list[LocalPostgres]) -> Database:
        db = Database.from_url(
            primary.url,
            replicas=[r.url for r in on],
            read_from="prefer-replica" if on else None,
            max_replica_lag=10,
            max_open_conns=POOL,
            max_idle_conns=POOL,
        )
        return ctx.stack.enter_context(db)

    db0, db1, db2 = dbkit([]), dbkit(standbys[:1]), dbkit(standbys)
    repo0, repo1, repo2 = Rows(db0), Rows(db1), Rows(db2)
    engine = sa.create_engine(primary.url, pool_size=POOL, max_overflow=0)
    ctx.stack.callback(engine.dispose)
    pool = ConnectionPool(
        libpq_url(primary.url),
        min_size=POOL,
        max_size=POOL,
        kwargs={"autocommit": True},
        open=True,
    )
    ctx.stack.callback(pool.close)
    pool.wait()

    def pg(key: int) -> tuple[Any, ...]:
        conn: psycopg.Connection[Any]
        with pool.connection() as conn:
            row = conn.execute(RAW_BY_ID, (key,)).fetchone()
        assert row is not None
        return tuple(row)

    def sqlalchemy(key: int) -> tuple[Any, ...]:
        with engine.connect() as conn:
            return tuple(conn.execute(by_id, {"id": key}).one())

    def get(repo: Rows) -> Read:
        def read(key: int) -> tuple[Any, ...]:
            row = repo.get(key)
            return row.id, row.balance, row.on_replica, row.port

        return read

    def readonly(db: Database) -> Read:
        def read(key: int) -> tuple[Any, ...]:
            with db.transaction(readonly=True) as conn:
                return tuple(conn.execute(by_id, {"id": key}).one())

        return read

    primary_only, replica_1, both = {primary.port}, {standbys[0].port}, {r.port for r in standbys}
    # contender -> (its read, the servers its reads must go to)
    plan: dict[str, tuple[Read, set[int]]] = {
        "psycopg_pool": (pg, primary_only),
        "sqlalchemy": (sqlalchemy, primary_only),
        "dbkit, 0 replicas": (get(repo0), primary_only),
        "dbkit, 1 replica": (get(repo1), replica_1),
        "dbkit, 2 replicas": (get(repo2), both),
        "dbkit tx, 0 replicas": (readonly(db0), primary_only),
        "dbkit tx, 2 replicas": (readonly(db2), both),
    }
    contenders: dict[str, Contender] = {}
    tallies: dict[str, Tally] = {}
    for name, (read, _) in plan.items():
        errors: list[str] = []
        tallies[name] = Tally()
        contenders[name] = Contender(
            _threaded(_reading(read, rows, tallies[name]), threads, errors), errors=errors
        )

    ops = threads * per_thread
    errors_before: dict[str, int] = {}

    def reset(name: str) -> None:
        tallies[name].clear()
        errors_before[name] = len(contenders[name].errors)

    def verify(name: str) -> list[str]:
        tally, expected = tallies[name], plan[name][1]
        problems = [f"wrong row: {w}" for w in tally.wrong[:3]]
        if len(tally.wrong) > 3:
            problems.append(f"... {len(tally.wrong)} wrong rows in all")
        seen = tally.by_server()
        done = sum(seen.values())
        failed = len(contenders[name].errors) - errors_before[name]
        if done != ops - failed:
            problems.append(f"{done:,} reads answered, expected {ops - failed:,}")
        by_port: Counter[int] = Counter()
        for (on_replica, port), n in seen.items():
            by_port[port] += n
            if port not in names or on_replica != (port != primary.port):
                problems.append(f"{n} reads answered by port {port}, on_replica={on_replica}")
        went = {port for port in by_port if port in names}
        if went != expected:
            problems.append(
                f"reads went to {_servers(went, names)}, expected {_servers(expected, names)}"
            )
        if len(expected) > 1 and done:
            for port in sorted(expected):
                if by_port[port] < MIN_SHARE * done:
                    problems.append(
                        f"{names[port]} served {by_port[port]:,} of {done:,} reads "
                        f"(less than {MIN_SHARE:.0%}): not spread"
                    )
        contenders[name].note = _spread(by_port, names)
        return problems

    return Workload(
        "replicas",
        f"read throughput with 0, 1, 2 streaming replicas: {threads} threads x {per_thread} "
        f"reads by pk of {rows:,} rows, pool of {POOL} per server, all on one machine",
        ops,
        contenders,
        baselines={"psycopg": "psycopg_pool", "sqlalchemy": "sqlalchemy"},
        goal=Goal("dbkit, 1 replica", "dbkit, 0 replicas", "rate", 0.8, no_errors=True),
        warmup_ops=threads * 10,
        reset=reset,
        verify=verify,
    )


def _servers(ports: set[int], names: dict[int, str]) -> str:
    return ", ".join(names.get(p, f"port {p}") for p in sorted(ports)) or "nowhere"


def _spread(by_port: Counter[int], names: dict[int, str]) -> str:
    """Where the reads went, e.g. ``replica 1 50% / replica 2 50%``."""
    done = sum(by_port.values())
    if not done:
        return "no reads"
    if len(by_port) == 1:
        return f"all on {names.get(next(iter(by_port)), '?')}"
    return " / ".join(
        f"{names.get(port, port)} {n / done:.0%}" for port, n in sorted(by_port.items())
    )
