"""When to run a failed piece of work again, and how long to wait first: pure functions.

Two budgets, kept apart because they answer different questions:

- **re-runs** (``RetryPolicy.reruns``, the ``N`` of ``retries=N``): the work itself met a
  failure that running it again may cure (a serialization failure, a deadlock, an aborted
  COMMIT, a connection lost before COMMIT).  Short waits, growing from 10 ms.
- **outage waits** (``outage_tries``, ``outage_delay``: the connect policy's
  ``max_retries`` and ``retry_delay``): the work could not even start because the database
  cannot be reached (refused, starting up, shutting down, breaker open).  Waiting for it
  does not spend ``N``; the count starts again once a run gets a connection.

``deadline`` (``retry_timeout``) caps the whole run, waits included.  The decisions
(``next_wait``) do no I/O and read no clock: callers pass the elapsed time and a random
number, so every one can be tested alone.  ``run_retrying`` applies them: the one loop that
runs, classifies, waits and runs again, for whole transactions and lone statements alike.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import sqlalchemy as sa
from loguru import logger

from dbkit.errors import sqlstate_of

__all__ = ["Attempts", "Failure", "RetryPolicy", "is_read", "next_wait", "run_retrying"]

R = TypeVar("R")

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


def run_retrying(
    once: Callable[[], R],
    policy: RetryPolicy,
    classify: Callable[[Exception, Attempts], Failure],
    *,
    what: str,
    rerun: Callable[[], None] | None = None,
    give_up: Callable[[Exception, Attempts, float], NoReturn] | None = None,
) -> R:
    """``once()`` until it succeeds or ``policy`` says to stop.  ``classify`` tells what a
    failure means (it may look at the budgets used so far); ``rerun()`` hears of each re-run
    that spends the budget (not of outage waits); ``give_up`` raises instead of the last
    error when the re-runs (or the deadline) are spent, else that error is raised."""
    attempts = Attempts()
    started = time.monotonic()
    while True:
        try:
            return once()
        except Exception as error:
            failure = classify(error, attempts)
            elapsed = time.monotonic() - started
            delay = next_wait(policy, attempts, failure, elapsed, random.random())
            if delay is None:
                if give_up is not None and failure is Failure.RERUN:
                    give_up(error, attempts, elapsed)
                raise
            if rerun is not None and failure is Failure.RERUN:
                rerun()
            logger.bind(
                attempt=attempts.reruns, sqlstate=sqlstate_of(error), failure=failure.name
            ).info(
                "running {} again in {:.3f}s after {} ({})",
                what,
                delay,
                type(error).__name__,
                failure.value,
            )
            time.sleep(delay)


def is_read(statement: Any) -> bool:
    """Whether running ``statement`` twice is harmless: a ``select()``, or SQL text that
    begins with SELECT, SHOW, VALUES, TABLE or EXPLAIN.  A SELECT that calls a function
    that writes is not told apart: pass ``idempotent=False`` for it."""
    if isinstance(statement, sa.TextClause):
        return statement.text.lstrip().upper().startswith(_READ_WORDS)
    return bool(getattr(statement, "is_select", False))
