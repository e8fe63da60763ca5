"""The chaos soak (tests/chaos) in the suite: 20 seconds of transfers under proxy cuts,
terminated backends and two server restarts.  Whatever the failure rate, dbkit must never
lie: no transfer reported committed may be missing or doubled, none reported failed may be
in the ledger, money is conserved, and no worker thread raises anything outside dbkit's
errors.  (Failure percentages and unknown outcomes are printed, not judged yet.)

It runs ``python -m tests.chaos`` as a subprocess, as the nox ``chaos`` session does: its
own server, its threads and its proxy stay out of the pytest process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from chaos.bank import COMMITTED, FAILED, UNKNOWN, Transfer, create_schema
from chaos.check import check
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
PROXY_KINDS = ("cut_all", "cut_after_commit", "cut_instead_of_commit", "terminate")


@pytest.mark.slow
def test_soak_under_faults_never_lies(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    command = [
        sys.executable,
        "-m",
        "tests.chaos",
        "--seconds=20",
        "--calm=4",
        "--threads=6",
        "--fault-every=0.8",
        "--restart-every=5",
        "--quiet",
        f"--json={out}",
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    print(run.stdout)
    print(run.stderr, file=sys.stderr)
    assert out.exists(), f"no result (exit {run.returncode}):\n{run.stderr[-4000:]}"
    result = json.loads(out.read_text())

    # The harness did its job: transfers ran, and every kind of fault happened.
    assert result["outcomes"]["committed"] > 0
    for kind in PROXY_KINDS:
        assert result["faults_by_kind"][kind] >= 1, kind
    assert result["faults_by_kind"]["restart_fast"] >= 1

    # No lies, nothing lost, nothing unexpected.
    assert result["violations"] == []
    assert result["total_money"] == result["expected_money"]
    assert result["committed_found"] == result["outcomes"]["committed"]
    assert result["crashes"] == []
    assert result["foreign_errors"] == {}
    assert result["ok"] and run.returncode == 0, result["problems"]


def _move(conn: psycopg.Connection[Any], transfer: Transfer) -> None:
    """What a committed transfer leaves behind."""
    conn.execute(
        "UPDATE accounts SET balance = balance + CASE id WHEN %s THEN -%s ELSE %s END"
        " WHERE id IN (%s, %s)",
        (transfer.src, transfer.amount, transfer.amount, transfer.src, transfer.dst),
    )
    conn.execute(
        "INSERT INTO ledger VALUES (%s, %s, %s, %s)",
        (transfer.id, transfer.src, transfer.dst, transfer.amount),
    )


def test_the_checker_catches_every_kind_of_lie(db_url: str) -> None:
    """The soak's verdict is only as good as its checker: honest outcomes pass, and each
    lie (a reported commit missing, a reported failure committed, a row nobody asked for,
    money out of thin air) is named."""
    url = make_url(db_url)
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database, autocommit=True
    ) as conn:
        create_schema(conn, accounts=3, initial=100)

        def transfer(outcome: str, src: int = 1, dst: int = 2, amount: int = 5) -> Transfer:
            return Transfer(uuid.uuid4(), src, dst, amount, 0, 0.0, 1.0, outcome)

        honest = [transfer(COMMITTED), transfer(FAILED), transfer(UNKNOWN), transfer(UNKNOWN)]
        _move(conn, honest[0])
        _move(conn, honest[2])  # an unknown outcome that did commit
        checked = check(conn, honest, accounts=3, initial=100)
        assert checked.violations == []
        assert checked.committed_found == 1
        assert [u.committed for u in checked.unknowns] == [True, False]

        missing, committed_failure, phantom = transfer(COMMITTED), transfer(FAILED), transfer("?")
        _move(conn, committed_failure)
        _move(conn, phantom)
        conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 3")
        checked = check(conn, [*honest, missing, committed_failure], accounts=3, initial=100)
        text = "\n".join(checked.violations)
        assert f"transfer {missing.id}" in text and "reported committed, found 0" in text
        assert f"transfer {committed_failure.id}" in text and "reported failed" in text
        assert "1 ledger row(s) of transfers nobody made" in text and str(phantom.id) in text
        assert "money not conserved: 301 != 300" in text
        assert "account 3: balance 101 but the ledger says 100" in text
        assert len(checked.violations) == 5
