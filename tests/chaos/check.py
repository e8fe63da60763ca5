"""The invariants, checked on a direct connection once workers and faults have stopped.

- money is conserved: the balances add up to what the accounts started with;
- every balance is its start plus the ledger's credits minus its debits;
- every transfer reported committed is in the ledger exactly once, as it was asked;
- no transfer reported failed is in the ledger;
- no ledger row belongs to a transfer nobody asked for;
- a transfer whose outcome was unknown may be in the ledger or not: each is looked up
  (and, when dbkit gave its xid, ``pg_xact_status`` must agree with the ledger).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from .bank import COMMITTED, FAILED, UNKNOWN, Transfer

__all__ = ["Checked", "Unknown", "check"]


@dataclass
class Unknown:
    """A transfer whose outcome dbkit could not tell, and which way it really went."""

    id: str
    xid: int | None
    committed: bool  # in the ledger
    xact_status: str | None  # pg_xact_status(xid) when the xid is known
    error: str | None


@dataclass
class Checked:
    violations: list[str] = field(default_factory=list)
    total_money: int = 0
    expected_money: int = 0
    ledger_rows: int = 0
    committed_found: int = 0
    unknowns: list[Unknown] = field(default_factory=list)


def _ledger(conn: psycopg.Connection[Any]) -> list[tuple[uuid.UUID, int, int, int]]:
    return [
        (row[0], int(row[1]), int(row[2]), int(row[3]))
        for row in conn.execute("SELECT id, src, dst, amount FROM ledger")
    ]


def _xact_status(conn: psycopg.Connection[Any], xid: int) -> str:
    try:
        row = conn.execute("SELECT pg_xact_status(%s::text::xid8)", (str(xid),)).fetchone()
    except psycopg.Error as error:
        return f"error: {type(error).__name__}"
    return str(row[0]) if row else "?"


def check(
    conn: psycopg.Connection[Any], transfers: Iterable[Transfer], accounts: int, initial: int
) -> Checked:
    """``conn``: autocommit, straight to the server (not through the proxy)."""
    result = Checked(expected_money=accounts * initial)
    bad = result.violations
    ledger = _ledger(conn)
    result.ledger_rows = len(ledger)
    counts = Counter(row[0] for row in ledger)
    rows = {row[0]: row for row in ledger}
    balances = {int(r[0]): int(r[1]) for r in conn.execute("SELECT id, balance FROM accounts")}

    result.total_money = sum(balances.values())
    if result.total_money != result.expected_money:
        bad.append(f"money not conserved: {result.total_money} != {result.expected_money}")
    if len(balances) != accounts:
        bad.append(f"{len(balances)} accounts instead of {accounts}")
    expected = dict.fromkeys(range(1, accounts + 1), initial)
    for _, src, dst, amount in ledger:
        expected[src] = expected.get(src, 0) - amount
        expected[dst] = expected.get(dst, 0) + amount
    for account in sorted(set(expected) | set(balances)):
        if balances.get(account) != expected.get(account):
            bad.append(
                f"account {account}: balance {balances.get(account)} but the ledger says "
                f"{expected.get(account)}"
            )

    asked: set[uuid.UUID] = set()
    for transfer in transfers:
        asked.add(transfer.id)
        found = counts.get(transfer.id, 0)
        label = f"transfer {transfer.id} (worker {transfer.worker}, {transfer.error or 'ok'})"
        if transfer.outcome == COMMITTED:
            if found != 1:
                bad.append(f"{label} reported committed, found {found} time(s) in the ledger")
                continue
            result.committed_found += 1
            row = rows[transfer.id]
            if row[1:] != (transfer.src, transfer.dst, transfer.amount):
                bad.append(f"{label} committed as {row[1:]}, asked {transfer.src, transfer.dst}")
        elif transfer.outcome == FAILED:
            if found:
                bad.append(f"{label} reported failed, but it is in the ledger: {transfer.message}")
        elif transfer.outcome == UNKNOWN:
            status = _xact_status(conn, transfer.xid) if transfer.xid is not None else None
            unknown = Unknown(str(transfer.id), transfer.xid, bool(found), status, transfer.error)
            result.unknowns.append(unknown)
            if status in ("committed", "aborted") and (status == "committed") != bool(found):
                bad.append(
                    f"{label}: pg_xact_status({transfer.xid}) = {status}, but the ledger "
                    f"{'has' if found else 'lacks'} it"
                )
        else:
            bad.append(f"{label} never finished")
    phantoms = [str(tid) for tid in counts if tid not in asked]
    if phantoms:
        bad.append(f"{len(phantoms)} ledger row(s) of transfers nobody made: {phantoms[:5]}")
    return result
