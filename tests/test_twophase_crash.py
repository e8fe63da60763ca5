"""The coordinator of a distributed transaction killed (SIGKILL of a subprocess) in each window
of two-phase commit, stopped at the right point by a proxy that holds a chosen statement
(``FaultProxy.hold_statement``); then recovery resolves it, and the money is where the
decision says it is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from faultproxy import FaultProxy

import dbkit
from dbkit import Database
from dbkit.local import LocalPostgres

# A coordinator: one transfer from orders (first database, the log's) to billing.
COORDINATOR = textwrap.dedent(
    """
    import sys
    import sqlalchemy as sa
    import dbkit

    orders_db = dbkit.Database.from_url(sys.argv[1]).connect()
    billing_db = dbkit.Database.from_url(sys.argv[2]).connect()
    with dbkit.distributed_transaction(orders_db, billing_db) as (orders, billing):
        orders.execute(sa.text("UPDATE orders SET amount = amount - 10"))
        billing.execute(sa.text("UPDATE billing SET amount = amount + 10"))
    print("committed", flush=True)
    """
)


def plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LocalPostgres, LocalPostgres]]:
    with LocalPostgres() as one, LocalPostgres() as two:
        yield one, two


@pytest.fixture
def fresh(servers: tuple[LocalPostgres, LocalPostgres]) -> None:
    for server, table in zip(servers, ("orders", "billing"), strict=True):
        with psycopg.connect(plain(server.url), autocommit=True) as conn:
            for (gid,) in conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall():
                conn.execute(f"ROLLBACK PREPARED '{gid}'")
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, amount int NOT NULL)")
            conn.execute(f"INSERT INTO {table} VALUES (1, 100)")
    with psycopg.connect(plain(servers[0].url), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS dbkit_twophase_log")


def state(servers: tuple[LocalPostgres, LocalPostgres]) -> tuple[int, int, list[str]]:
    """(orders amount, billing amount, prepared gids on both)."""
    amounts, gids = [], []
    for server, table in zip(servers, ("orders", "billing"), strict=True):
        with psycopg.connect(plain(server.url), autocommit=True) as conn:
            row = conn.execute(f"SELECT amount FROM {table}").fetchone()
            assert row is not None
            amounts.append(row[0])
            gids += [r[0] for r in conn.execute("SELECT gid FROM pg_prepared_xacts")]
    return amounts[0], amounts[1], sorted(gids)


def kill_coordinator_at(
    servers: tuple[LocalPostgres, LocalPostgres], which: int, prefix: str
) -> None:
    """Run a coordinator through two proxies, hold ``prefix`` on proxy ``which``, and
    SIGKILL the coordinator once that statement is held."""
    with (
        FaultProxy("127.0.0.1", servers[0].port) as one,
        FaultProxy("127.0.0.1", servers[1].port) as two,
    ):
        proxies = (one, two)
        proxies[which].hold_statement(prefix)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DBKIT_")}
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                COORDINATOR,
                one.url_for(servers[0].url),
                two.url_for(servers[1].url),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            held = proxies[which].wait_held(timeout=60)
            if not held:
                out, err = process.communicate(timeout=30)
                raise AssertionError(f"{prefix!r} was never sent: {out} {err}")
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            assert process.stdout is not None and process.stderr is not None
            process.stdout.close()
            process.stderr.close()


def recover(servers: tuple[LocalPostgres, LocalPostgres]) -> dbkit.RecoveryReport:
    """Recovery, once the dead coordinator's sessions have ended (bounded wait)."""
    with (
        Database.from_url(servers[0].url) as orders,
        Database.from_url(servers[1].url) as billing,
    ):
        deadline = time.monotonic() + 60
        while True:
            report = dbkit.recover_prepared(orders, billing)
            if not report.in_progress:
                return report
            if time.monotonic() > deadline:
                raise AssertionError(f"the coordinator still looks alive: {report}")
            time.sleep(0.1)


@pytest.mark.usefixtures("fresh")
def test_killed_after_one_prepare_is_rolled_back(
    servers: tuple[LocalPostgres, LocalPostgres],
) -> None:
    kill_coordinator_at(servers, 1, "PREPARE TRANSACTION")  # billing's prepare held
    orders, billing, gids = state(servers)
    assert (orders, billing) == (100, 100) and len(gids) == 1 and gids[0].endswith(":0")
    report = recover(servers)
    assert report.rolled_back == tuple(gids) and report.committed == ()
    assert state(servers) == (100, 100, [])
    assert recover(servers) == dbkit.RecoveryReport()  # idempotent


@pytest.mark.usefixtures("fresh")
def test_killed_after_the_decision_before_the_commits_is_committed(
    servers: tuple[LocalPostgres, LocalPostgres],
) -> None:
    kill_coordinator_at(servers, 0, "COMMIT PREPARED")  # the first COMMIT PREPARED held
    orders, billing, gids = state(servers)
    assert (orders, billing) == (100, 100) and len(gids) == 2
    report = recover(servers)
    assert sorted(report.committed) == gids and report.rolled_back == ()
    assert state(servers) == (90, 110, [])
    with psycopg.connect(plain(servers[0].url)) as conn:
        row = conn.execute("SELECT count(*) FROM dbkit_twophase_log").fetchone()
        assert row == (0,)  # the decision is pruned once every part is done


@pytest.mark.usefixtures("fresh")
def test_killed_between_the_commits_is_completed(
    servers: tuple[LocalPostgres, LocalPostgres],
) -> None:
    kill_coordinator_at(servers, 1, "COMMIT PREPARED")  # billing's COMMIT PREPARED held
    orders, billing, gids = state(servers)
    assert (orders, billing) == (90, 100) and len(gids) == 1 and gids[0].endswith(":1")
    report = recover(servers)
    assert report.committed == tuple(gids)
    assert state(servers) == (90, 110, [])


@pytest.mark.usefixtures("fresh")
def test_a_failure_after_the_decision_says_the_commit_will_complete(
    servers: tuple[LocalPostgres, LocalPostgres],
) -> None:
    """The link to billing dies while its COMMIT PREPARED is in flight: the coordinator
    raises CommitPending naming that part, and recovery completes the commit."""
    with FaultProxy("127.0.0.1", servers[1].port) as two:
        orders_db = Database.from_url(servers[0].url).connect()
        billing_db = Database.from_url(two.url_for(servers[1].url), max_retries=0).connect()
        two.hold_statement("COMMIT PREPARED")
        errors: list[BaseException] = []

        def cut_when_held() -> None:
            try:
                assert two.wait_held(timeout=60)
                two.cut_all()
            except BaseException as error:
                errors.append(error)

        cutter = threading.Thread(target=cut_when_held)
        cutter.start()
        try:
            with (
                pytest.raises(dbkit.CommitPending, match="will complete") as pending,
                dbkit.distributed_transaction(orders_db, billing_db) as (orders, billing),
            ):
                orders.execute(sa.text("UPDATE orders SET amount = amount - 10"))
                billing.execute(sa.text("UPDATE billing SET amount = amount + 10"))
        finally:
            cutter.join()
            orders_db.close()
            billing_db.close()
        assert not errors, errors
    (gid,) = pending.value.gids
    assert state(servers) == (90, 100, [gid])
    assert recover(servers).committed == (gid,)
    assert state(servers) == (90, 110, [])
