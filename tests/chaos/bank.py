"""The bank: accounts and a ledger, the transfer transaction, and the worker threads that
run transfers and record what dbkit said about each one."""

from __future__ import annotations

import random
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy as sa

from dbkit import CommitOutcomeUnknown, Database, DbkitError, TransactionError

__all__ = [
    "COMMITTED",
    "FAILED",
    "UNKNOWN",
    "Bank",
    "Transfer",
    "Workers",
    "classify",
    "create_schema",
]

COMMITTED, FAILED, UNKNOWN = "committed", "failed", "unknown"

_DEBIT_CREDIT = sa.text("UPDATE accounts SET balance = balance + :delta WHERE id = :id")
_RECORD = sa.text("INSERT INTO ledger (id, src, dst, amount) VALUES (:id, :src, :dst, :amount)")


def create_schema(conn: psycopg.Connection[Any], accounts: int, initial: int) -> None:
    """``accounts(id, balance)`` with ``accounts`` rows of ``initial``, an empty ``ledger``."""
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
    conn.execute(
        "CREATE TABLE ledger (id uuid PRIMARY KEY, src int NOT NULL, dst int NOT NULL,"
        " amount int NOT NULL)"
    )
    conn.execute(
        "INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) AS g", (initial, accounts)
    )


@dataclass
class Transfer:
    """One attempt to move ``amount`` from ``src`` to ``dst``, and what dbkit reported.
    Times are seconds since the soak started."""

    id: uuid.UUID
    src: int
    dst: int
    amount: int
    worker: int
    started: float
    finished: float | None = None
    outcome: str | None = None  # COMMITTED, FAILED or UNKNOWN; None while running
    error: str | None = None  # the exception's class name
    message: str | None = None
    xid: int | None = None  # CommitOutcomeUnknown.xid
    foreign: bool = False  # the exception is not a DbkitError: it escaped dbkit's hierarchy


def classify(error: BaseException) -> tuple[str, int | None]:
    """(outcome, xid) of a transfer that raised ``error``.  A lost COMMIT is ``unknown``:
    ``CommitOutcomeUnknown``, or the ``TransactionError`` dbkit raised for it before it
    could resolve outcomes ("… whether the transaction committed is unknown")."""
    if isinstance(error, CommitOutcomeUnknown):
        return UNKNOWN, error.xid
    if isinstance(error, TransactionError) and "unknown" in str(error).lower():
        return UNKNOWN, None
    return FAILED, None


class Bank:
    """The transfer transaction on a ``Database``, and the record of every transfer."""

    def __init__(self, db: Database, accounts: int, retries: int, clock: Callable[[], float]):
        self.db = db
        self.accounts = accounts
        self.clock = clock
        self._lock = threading.Lock()
        self.transfers: list[Transfer] = []
        # Tracebacks of exceptions that escaped a worker's own code (never expected).
        self.crashes: list[str] = []

        @db.transaction(retries=retries)
        def transfer(tid: uuid.UUID, src: int, dst: int, amount: int) -> None:
            # Accounts in id order: two transfers between the same pair never deadlock.
            for account, delta in sorted(((src, -amount), (dst, amount))):
                db.execute(_DEBIT_CREDIT, {"id": account, "delta": delta})
            db.execute(_RECORD, {"id": tid, "src": src, "dst": dst, "amount": amount})

        self._transfer = transfer

    def run_one(self, rng: random.Random, worker: int) -> Transfer:
        src, dst = rng.sample(range(1, self.accounts + 1), 2)
        record = Transfer(uuid.uuid4(), src, dst, rng.randint(1, 100), worker, self.clock())
        with self._lock:
            self.transfers.append(record)
        try:
            self._transfer(record.id, record.src, record.dst, record.amount)
        except Exception as error:
            record.outcome, record.xid = classify(error)
            record.error = type(error).__name__
            record.message = " ".join(str(error).split())[:300]
            record.foreign = not isinstance(error, DbkitError)
        else:
            record.outcome = COMMITTED
        record.finished = self.clock()
        return record

    def crashed(self, where: str) -> None:
        with self._lock:
            self.crashes.append(f"{where}:\n{traceback.format_exc()}")

    def snapshot(self) -> list[Transfer]:
        with self._lock:
            return list(self.transfers)


@dataclass
class Workers:
    """``count`` threads running transfers back to back until ``stop()``."""

    bank: Bank
    count: int
    seed: int
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for n in range(self.count):
            thread = threading.Thread(
                target=self._loop, args=(n,), name=f"chaos-worker-{n}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _loop(self, n: int) -> None:
        try:
            rng = random.Random(self.seed * 1000 + n)
            while not self._stop.is_set():
                self.bank.run_one(rng, n)
        except BaseException:  # recorded: fails the run, never dropped
            self.bank.crashed(f"worker {n}")

    def request_stop(self) -> None:
        """No new transfer; those under way go on to their end."""
        self._stop.set()

    def join(self, timeout: float) -> list[str]:
        """Wait for every worker; for each one still running after ``timeout`` seconds
        (hung), a message with its stack."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        frames = sys._current_frames()
        return [
            f"{thread.name} did not finish its transfer within {timeout:g}s; it is at:\n"
            + "".join(traceback.format_stack(frames[thread.ident]))
            for thread in self._threads
            if thread.is_alive() and thread.ident in frames
        ]
