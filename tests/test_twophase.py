"""Two-phase commit across two real servers: the happy path, an exception in the body, a
deferred constraint failing at PREPARE, the refusal of a server without prepared
transactions, retries, recovery (foreign transactions left alone, a live coordinator never
split, concurrent runs) and a soak of transfers that must conserve money."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from cli_helpers import run_dbkit

import dbkit
from dbkit import Database, RetryableError, TransactionError
from dbkit.local import LocalPostgres


def plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LocalPostgres, LocalPostgres]]:
    with LocalPostgres() as one, LocalPostgres() as two:
        yield one, two


@pytest.fixture
def dbs(servers: tuple[LocalPostgres, LocalPostgres]) -> Iterator[tuple[Database, Database]]:
    """Orders on the first server (which holds the log), billing on the second, each with
    a fresh table; nothing left prepared afterwards."""
    one, two = servers
    for server, table in ((one, "orders"), (two, "billing")):
        with psycopg.connect(plain(server.url), autocommit=True) as conn:
            for (gid,) in conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall():
                conn.execute(f"ROLLBACK PREPARED '{gid}'")
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, amount int NOT NULL)")
            conn.execute(f"INSERT INTO {table} VALUES (1, 100)")
    orders, billing = Database.from_url(one.url).connect(), Database.from_url(two.url).connect()
    try:
        yield orders, billing
    finally:
        orders.close()
        billing.close()


def amount(db: Database, table: str) -> int:
    return int(db.scalar(sa.text(f"SELECT amount FROM {table} WHERE id = 1")))


def prepared(*servers: LocalPostgres) -> list[str]:
    names = []
    for server in servers:
        with psycopg.connect(plain(server.url), autocommit=True) as conn:
            names += [row[0] for row in conn.execute("SELECT gid FROM pg_prepared_xacts")]
    return names


def move(orders: Any, billing: Any, n: int = 10) -> None:
    orders.execute(sa.text("UPDATE orders SET amount = amount - :n WHERE id = 1"), {"n": n})
    billing.execute(sa.text("UPDATE billing SET amount = amount + :n WHERE id = 1"), {"n": n})


def test_both_parts_commit_and_on_commit_runs_after_the_whole(
    dbs: tuple[Database, Database], servers: tuple[LocalPostgres, LocalPostgres]
) -> None:
    orders_db, billing_db = dbs
    seen: list[tuple[int, int]] = []

    def after() -> None:  # both parts must be visible to everyone by now
        with (
            psycopg.connect(plain(servers[0].url)) as one,
            psycopg.connect(plain(servers[1].url)) as two,
        ):
            a = one.execute("SELECT amount FROM orders").fetchone()
            b = two.execute("SELECT amount FROM billing").fetchone()
            assert a is not None and b is not None
            seen.append((a[0], b[0]))

    with dbkit.distributed_transaction(orders_db, billing_db) as (orders, billing):
        move(orders, billing)
        orders_db.on_commit(after)
        with billing_db.transaction():  # a savepoint of billing's part
            billing_db.execute(sa.text("UPDATE billing SET amount = amount + 1"))
        with pytest.raises(ValueError), orders_db.transaction():
            orders_db.execute(sa.text("UPDATE orders SET amount = 0"))
            raise ValueError("rolled back to its savepoint")
        assert orders_db.in_transaction() and billing_db.in_transaction()
    assert seen == [(90, 111)]
    assert (amount(orders_db, "orders"), amount(billing_db, "billing")) == (90, 111)
    assert prepared(*servers) == []
    assert orders_db.scalar(sa.text("SELECT count(*) FROM dbkit_twophase_log")) == 0


def test_an_exception_in_the_body_rolls_back_every_part_and_propagates(
    dbs: tuple[Database, Database], servers: tuple[LocalPostgres, LocalPostgres]
) -> None:
    orders_db, billing_db = dbs
    called: list[str] = []

    class Refused(Exception):
        pass

    with pytest.raises(Refused), dbkit.distributed_transaction(*dbs) as (orders, billing):
        move(orders, billing)
        billing_db.on_commit(lambda: called.append("no"))
        raise Refused
    assert (amount(orders_db, "orders"), amount(billing_db, "billing")) == (100, 100)
    assert called == [] and prepared(*servers) == []
    assert not orders_db.in_transaction() and not billing_db.in_transaction()


def test_a_deferred_constraint_failing_at_prepare_rolls_back_the_prepared_parts(
    dbs: tuple[Database, Database], servers: tuple[LocalPostgres, LocalPostgres]
) -> None:
    orders_db, billing_db = dbs
    billing_db.execute(sa.text("DROP TABLE IF EXISTS children, parents"))
    billing_db.execute(sa.text("CREATE TABLE parents (id int PRIMARY KEY)"))
    billing_db.execute(
        sa.text(
            "CREATE TABLE children (id int PRIMARY KEY, "
            "parent int REFERENCES parents DEFERRABLE INITIALLY DEFERRED)"
        )
    )
    with pytest.raises(dbkit.ForeignKeyError), dbkit.distributed_transaction(*dbs) as (o, b):
        move(o, b)
        b.execute(sa.text("INSERT INTO children VALUES (1, 42)"))  # no parent 42: at PREPARE
    assert (amount(orders_db, "orders"), amount(billing_db, "billing")) == (100, 100)
    assert prepared(*servers) == []  # orders was prepared first, then rolled back
    assert orders_db.scalar(sa.text("SELECT count(*) FROM dbkit_twophase_log")) == 0


def test_a_server_without_prepared_transactions_is_refused_before_the_body(
    dbs: tuple[Database, Database],
) -> None:
    with LocalPostgres(settings={"max_prepared_transactions": 0}) as plain_server:
        other = Database.from_url(plain_server.url).connect()
        ran: list[bool] = []
        try:
            with (
                pytest.raises(TransactionError, match="max_prepared_transactions = 0"),
                dbkit.distributed_transaction(dbs[0], other),
            ):
                ran.append(True)
        finally:
            other.close()
        assert ran == []
    with pytest.raises(TransactionError, match="named twice"):
        with dbkit.distributed_transaction(dbs[0], dbs[0]):
            pass


def test_retries_run_the_whole_distributed_transaction_again(
    dbs: tuple[Database, Database], servers: tuple[LocalPostgres, LocalPostgres]
) -> None:
    """A part meets a row another session holds (55P03 with NOWAIT): the whole distributed
    transaction runs again once the other session lets go."""
    orders_db, billing_db = dbs
    holder = psycopg.connect(plain(servers[1].url))
    holder.execute("SELECT 1 FROM billing WHERE id = 1 FOR UPDATE")
    attempts: list[int] = []

    def transfer(orders: Any, billing: Any) -> str:
        attempts.append(len(attempts) + 1)
        orders.execute(sa.text("UPDATE orders SET amount = amount - 5 WHERE id = 1"))
        try:
            billing.execute(sa.text("SELECT 1 FROM billing WHERE id = 1 FOR UPDATE NOWAIT"))
        finally:
            holder.rollback()  # the next run finds the row free
        billing.execute(sa.text("UPDATE billing SET amount = amount + 5 WHERE id = 1"))
        return "done"

    try:
        assert dbkit.run_distributed(transfer, *dbs, retries=2) == "done"
    finally:
        holder.close()
    assert attempts == [1, 2]
    assert (amount(orders_db, "orders"), amount(billing_db, "billing")) == (95, 105)
    with pytest.raises(RetryableError):
        held = psycopg.connect(plain(servers[1].url))
        held.execute("SELECT 1 FROM billing WHERE id = 1 FOR UPDATE")
        try:
            dbkit.run_distributed(
                lambda o, b: b.execute(
                    sa.text("SELECT 1 FROM billing WHERE id = 1 FOR UPDATE NOWAIT")
                ),
                *dbs,
                retries=1,
            )
        finally:
            held.close()
    assert prepared(*servers) == []


def test_recovery_leaves_foreign_and_live_transactions_alone(
    dbs: tuple[Database, Database], servers: tuple[LocalPostgres, LocalPostgres]
) -> None:
    orders_db, billing_db = dbs
    with psycopg.connect(plain(servers[1].url)) as other:
        other.execute("INSERT INTO billing VALUES (2, 1)")
        other.execute("PREPARE TRANSACTION 'someone-else'")
    try:
        in_body = threading.Event()
        go_on = threading.Event()
        errors: list[BaseException] = []

        def coordinator() -> None:
            try:
                with dbkit.distributed_transaction(*dbs) as (o, b):
                    move(o, b)
                    in_body.set()
                    assert go_on.wait(30)
            except BaseException as error:
                errors.append(error)

        thread = threading.Thread(target=coordinator)
        thread.start()
        try:
            assert in_body.wait(30)
            report = dbkit.recover_prepared(orders_db, billing_db)
            assert report.foreign == ("someone-else",)
            assert (report.committed, report.rolled_back) == ((), ())
        finally:
            go_on.set()
            thread.join()
        assert not errors, errors
        assert (amount(orders_db, "orders"), amount(billing_db, "billing")) == (90, 110)
        assert prepared(*servers) == ["someone-else"]
    finally:
        with psycopg.connect(plain(servers[1].url), autocommit=True) as conn:
            conn.execute("ROLLBACK PREPARED 'someone-else'")


def test_a_soak_of_concurrent_transfers_conserves_money(
    dbs: tuple[Database, Database], servers: tuple[LocalPostgres, LocalPostgres]
) -> None:
    """200 transfers from 4 threads between the two databases, recovery running beside
    them: every unit that left one side arrived on the other."""
    orders_db, billing_db = dbs
    errors: list[BaseException] = []
    done = threading.Event()

    def transfers(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(50):
                n = rng.randint(1, 3)
                dbkit.run_distributed(lambda o, b, n=n: move(o, b, n), *dbs, retries=20)
        except BaseException as error:
            errors.append(error)

    def recoverer() -> None:
        try:
            while not done.is_set():
                report = dbkit.recover_prepared(*dbs)
                assert not report.committed and not report.rolled_back  # nobody crashed
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=transfers, args=(seed,)) for seed in range(4)]
    watcher = threading.Thread(target=recoverer)
    watcher.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    watcher.join()
    assert not errors, errors
    left, arrived = 100 - amount(orders_db, "orders"), amount(billing_db, "billing") - 100
    assert left == arrived > 200
    assert prepared(*servers) == []


def test_dbkit_recover_on_the_command_line(
    servers: tuple[LocalPostgres, LocalPostgres], dbs: tuple[Database, Database]
) -> None:
    result = run_dbkit("recover", "--url", servers[0].url, "--url", servers[1].url)
    assert result.returncode == 0, result.stderr
    assert "committed 0, rolled back 0" in result.stdout
