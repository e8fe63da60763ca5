"""When to run a failed piece of work again, and how long to wait first: pure functions.

Two budgets, kept apart because they answer different questions:

- **re-runs** (``RetryPolicy.reruns``, the ``N`` of ``retries=N``): the work itself met a
  failure that running it again may cure (a serialization failure, a deadlock, an aborted
  COMMIT, a connection lost before COMMIT).  Short waits, growing from 10 ms.
- **outage waits** (``outage_tries``, ``outage_delay``: the connect policy's
  ``max_retries`` and ``retry_delay``): the work could not even start because the database
  cannot be reached (refused, starting up, shutting down, breaker open).  Waiting for it
  does not spend ``N``; the count starts again once a run gets a connection.

``deadline`` (``retry_timeout``) caps the whole run, waits included.  Nothing here does I/O
or reads the clock: callers pass the elapsed time and a random number, so every decision
can be tested alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

__all__ = ["Attempts", "Failure", "RetryPolicy", "is_read", "next_wait"]

# First words of SQL text that only reads (WITH is not one: it may carry an UPDATE).
_READ_WORDS = ("SELECT", "SHOW", "VALUES", "TABLE", "EXPLAIN")


class Failure(enum.Enum):
    """What a failed run tells about running it again."""

    RERUN = "running the work again may succeed"
    OUTAGE = "the database cannot be reached; nothing was sent"
    FINAL = "running it again cannot help, or could repeat committed work"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    reruns: int = 0
    outage_tries: int = 5
    outage_delay: float = 0.5
    max_outage_delay: float = 10.0
    rerun_delay: float = 0.01
    max_rerun_delay: float = 1.0
    deadline: float | None = None  # seconds for the whole run; None = no cap


@dataclass(slots=True)
class Attempts:
    """How much of each budget a run has used."""

    reruns: int = 0
    outage_waits: int = 0  # consecutive, since a run last got a connection


def _jittered(step: float, rand: float) -> float:
    """Between half and all of ``step``: spreads a crowd without near-zero waits."""
    return step / 2 + step / 2 * rand


def next_wait(
    policy: RetryPolicy, attempts: Attempts, failure: Failure, elapsed: float, rand: float
) -> float | None:
    """Seconds to wait before the next run, or None to give up; counts the run in
    ``attempts``.  ``elapsed``: seconds since the first run began; ``rand`` in [0, 1)."""
    if failure is Failure.FINAL:
        return None
    if failure is Failure.OUTAGE:
        if attempts.outage_waits >= policy.outage_tries:
            return None
        attempts.outage_waits += 1
        step = policy.outage_delay * 2 ** (attempts.outage_waits - 1)
        delay = _jittered(min(policy.max_outage_delay, step), rand)
    else:
        if attempts.reruns >= policy.reruns:
            return None
        attempts.reruns += 1
        attempts.outage_waits = 0
        step = policy.rerun_delay * 2**attempts.reruns
        delay = _jittered(min(policy.max_rerun_delay, step), rand)
    if policy.deadline is not None:
        left = policy.deadline - elapsed
        if left <= 0:
            return None
        delay = min(delay, left)
    return delay


def is_read(statement: Any) -> bool:
    """Whether running ``statement`` twice is harmless: a ``select()``, or SQL text that
    begins with SELECT, SHOW, VALUES, TABLE or EXPLAIN.  A SELECT that calls a function
    that writes is not told apart: pass ``idempotent=False`` for it."""
    if isinstance(statement, sa.TextClause):
        return statement.text.lstrip().upper().startswith(_READ_WORDS)
    return bool(getattr(statement, "is_select", False))
