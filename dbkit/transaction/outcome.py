"""Resolving a COMMIT whose answer was lost: ask another connection what happened.

The transaction's 64-bit id was read before COMMIT left (``dbkit.xact``).  A fresh
connection asks ``pg_xact_status(id)``:

- ``committed``: the block ends normally, its ``on_commit`` callbacks run;
- ``aborted``: nothing was saved, so the transaction may run again (``RetryableError``);
  after a crash, a transaction that was open is reported aborted;
- ``in progress``: the old backend is still finishing (it has not yet noticed the link is
  gone): ask again until ``patience`` runs out, then give up;
- no answer (the server stays unreachable past the connect policy, or the id is too old
  for the commit log kept): unknown, ``CommitOutcomeUnknown``, never retried.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Literal

from loguru import logger

from dbkit.errors import CircuitOpenError, CommitOutcomeUnknown, RetryableError, is_transient
from dbkit.retrying import Attempts, Failure, RetryPolicy, next_wait
from dbkit.xact import XactConnection

__all__ = ["Outcome", "resolve_commit", "settle_lost_commit"]

Outcome = Literal["committed", "aborted"]

# First pause between two "in progress" answers; doubled each time, up to the cap.
_FIRST_POLL = 0.02
_MAX_POLL = 0.5


def resolve_commit(
    xid: int,
    ask: Callable[[int], str | None],
    *,
    patience: float,
    outage: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
) -> Outcome | None:
    """What became of transaction ``xid``: ``committed``, ``aborted``, or None (unknown).

    ``ask(xid)`` returns the server's ``pg_xact_status`` (``'in progress'``, or None when
    the id is too old) and raises when the server cannot be reached, which is waited out
    with ``outage`` (the connect policy).  ``patience``: how long "in progress" is waited
    for."""
    started = clock()
    attempts = Attempts()
    poll = _FIRST_POLL
    while True:
        try:
            status = ask(xid)
        except Exception as error:
            if not (is_transient(error) or isinstance(error, CircuitOpenError)):
                logger.opt(exception=error).warning("cannot ask the outcome of transaction {}", xid)
                return None
            wait = next_wait(outage, attempts, Failure.OUTAGE, clock() - started, rand())
            if wait is None:
                return None
            sleep(wait)
            continue
        attempts.outage_waits = 0
        if status == "committed":
            return "committed"
        if status == "aborted":
            return "aborted"
        if status != "in progress" or clock() - started >= patience:
            return None
        sleep(min(poll, max(0.0, patience - (clock() - started))))
        poll = min(_MAX_POLL, poll * 2)


def settle_lost_commit(
    resolve: Callable[[int], Outcome | None] | None,
    xact: XactConnection | None,
    error: BaseException,
    *,
    readonly: bool = False,
) -> None:
    """The connection died while COMMIT was in flight (``error``): return when the
    transaction committed (or was read-only: nothing to commit), raise ``RetryableError``
    when it was rolled back, else ``CommitOutcomeUnknown``."""
    if readonly and resolve is not None:
        return
    if resolve is None or xact is None:
        raise CommitOutcomeUnknown(
            "the connection was lost during COMMIT; whether the transaction committed is "
            "unknown (resolve_commit_outcome is off)"
        ) from error
    if not xact.xact_wrote:
        return  # nothing was written: there was nothing to commit
    xid = xact.xact_id
    if xid is None:
        raise CommitOutcomeUnknown(
            "the connection was lost during COMMIT; whether the transaction committed is "
            "unknown (this server cannot report transaction ids: PostgreSQL 10 or later can)"
        ) from error
    outcome = resolve(xid)
    logger.bind(xid=xid, outcome=outcome or "unknown").warning(
        "connection lost during COMMIT of transaction {}: {}", xid, outcome or "unknown"
    )
    if outcome == "committed":
        return
    if outcome == "aborted":
        raise RetryableError(
            f"the connection was lost during COMMIT and transaction {xid} was rolled back: "
            "nothing was saved, and it can be run again "
            "(db.run_in_transaction(fn, retries=N) or @db.transaction(retries=N))"
        ) from error
    raise CommitOutcomeUnknown(
        f"the connection was lost during COMMIT and the outcome of transaction {xid} could "
        f"not be learnt; check pg_xact_status('{xid}') before running it again",
        xid=xid,
    ) from error
