"""``recover_prepared(db1, db2, ...)``: finish the distributed transactions whose coordinator
is gone, as it decided.

For every prepared transaction with a dbkit gid on the given databases (the first one holds
the decision log), grouped by distributed transaction:

- if its coordinator still runs (its session advisory lock on the first database is
  held), it is left alone: recovery never splits a live transaction;
- else its decision is read from the log, and when there is none, recovery writes
  ``'rollback'`` (the primary key makes this exclusive with a late coordinator's
  ``'commit'``: whoever writes first decides, and a coordinator that comes back finds
  recovery's decision and reports it);
- every part on the given databases is then committed or rolled back (``COMMIT PREPARED`` /
  ``ROLLBACK PREPARED``; a part someone else finished meanwhile is skipped).

A commit decision is pruned once no given database holds a part of it (and at least as
many databases were given as it had parts); a rollback decision after a day, when no
coordinator can still be waiting to read it.  Prepared transactions that are not dbkit's
are reported and left alone.  Runs are serialized by an advisory lock on the first
database, so running it concurrently, or again, is safe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa
from loguru import logger

from dbkit.errors import LockNotAvailable, sqlstate_of
from dbkit.twophase.log import LOG_TABLE, coordinator_key, ensure_log, parse_gid

if TYPE_CHECKING:
    from dbkit.database import Database

__all__ = ["RecoveryReport", "recover_at_connect", "recover_prepared"]

_PREPARED = sa.text(
    "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared"
)
_IS_PREPARED = sa.text("SELECT 1 FROM pg_prepared_xacts WHERE gid = :gid")
_OUTCOME = sa.text(f"SELECT outcome, parts FROM {LOG_TABLE} WHERE id = :id")
_ROLLBACK = sa.text(
    f"INSERT INTO {LOG_TABLE} (id, outcome, parts) VALUES (:id, 'rollback', :parts) "
    "ON CONFLICT (id) DO NOTHING RETURNING outcome"
)
_COMMITTED_ROWS = sa.text(f"SELECT id, parts FROM {LOG_TABLE} WHERE outcome = 'commit'")
_FORGET = sa.text(f"DELETE FROM {LOG_TABLE} WHERE id = :id RETURNING id")
_FORGET_OLD_ROLLBACKS = sa.text(
    f"DELETE FROM {LOG_TABLE} WHERE outcome = 'rollback' "
    "AND decided_at < now() - interval '1 day' RETURNING id"
)
_UNDEFINED_OBJECT = "42704"  # the prepared transaction is gone: someone finished it


@dataclass(frozen=True)
class RecoveryReport:
    """What one run did, as gids: ``committed`` and ``rolled_back`` it finished,
    ``in_progress`` it left to a coordinator that still runs, ``foreign`` prepared
    transactions that are not dbkit's (left alone); ``pruned`` decisions removed."""

    committed: tuple[str, ...] = ()
    rolled_back: tuple[str, ...] = ()
    in_progress: tuple[str, ...] = ()
    foreign: tuple[str, ...] = ()
    pruned: int = 0


def recover_prepared(*dbs: Database) -> RecoveryReport:
    """Finish what crashed coordinators left prepared on ``dbs`` (the first one holds the
    decision log): commit what was decided, roll back what was not (module docstring)."""
    if not dbs:
        raise TypeError("recover_prepared() needs at least one Database")
    first = dbs[0]
    ensure_log(first)
    committed: list[str] = []
    rolled_back: list[str] = []
    in_progress: list[str] = []
    foreign: list[str] = []
    with first.advisory_lock("dbkit.twophase recovery"):
        parts = _prepared_parts(dbs, foreign)
        for transaction_id, found in parts.items():
            with _coordinator_gone(first, transaction_id) as gone:
                if not gone:
                    in_progress += [name for _, name in found]
                    continue
                # Its coordinator may have finished between the listing and the lock.
                found = [(db, name) for db, name in found if _still_prepared(db, name)]
                if not found:
                    continue
                commit = _outcome(first, transaction_id, len(found)) == "commit"
                finished = [name for db, name in found if _finish(db, name, commit)]
                (committed if commit else rolled_back).extend(finished)
        pruned = _prune(first, dbs)
    report = RecoveryReport(
        tuple(committed), tuple(rolled_back), tuple(in_progress), tuple(foreign), pruned
    )
    if committed or rolled_back:
        logger.bind(audit="twophase_recovered").info(
            "two-phase recovery: committed {}, rolled back {}", committed, rolled_back
        )
    return report


def recover_at_connect(*dbs: Database) -> None:
    """Run ``recover_prepared(*dbs)`` each time the first database connects (and now, if
    it is connected already): a process that restarts after a crash finishes what it left
    prepared before it starts new work."""
    first = dbs[0]
    first.on_connect(lambda: _recover_quietly(dbs))
    if first.is_connected:
        _recover_quietly(dbs)


def _recover_quietly(dbs: tuple[Database, ...]) -> None:
    try:
        recover_prepared(*dbs)
    except Exception as error:  # a participant that is down: the next run finishes it
        logger.warning("two-phase recovery at connect failed: {}", error)


def _prepared_parts(
    dbs: tuple[Database, ...], foreign: list[str]
) -> dict[str, list[tuple[Database, str]]]:
    """dbkit's prepared transactions on ``dbs``, by distributed transaction id."""
    parts: dict[str, list[tuple[Database, str]]] = {}
    for db in dbs:
        for (name,) in db.execute(_PREPARED):
            parsed = parse_gid(name)
            if parsed is None:
                foreign.append(name)
            else:
                parts.setdefault(parsed[0], []).append((db, name))
    return parts


@contextlib.contextmanager
def _coordinator_gone(first: Database, transaction_id: str) -> Iterator[bool]:
    """True (and holding its lock meanwhile) when the coordinator's session is gone."""
    try:
        with first.advisory_lock(coordinator_key(transaction_id), wait=False):
            yield True
    except LockNotAvailable:
        yield False


def _outcome(first: Database, transaction_id: str, parts: int) -> str:
    """The decision, or 'rollback' written now when there is none."""
    row = first.execute(_OUTCOME, {"id": transaction_id}).first()
    if row is not None:
        return str(row[0])
    with first.transaction(settings={"synchronous_commit": "on"}) as conn:
        written = conn.execute(_ROLLBACK, {"id": transaction_id, "parts": parts}).first()
    if written is not None:
        return "rollback"
    return str(first.execute(_OUTCOME, {"id": transaction_id}).one()[0])


def _still_prepared(db: Database, name: str) -> bool:
    return db.scalar(_IS_PREPARED, {"gid": name}) is not None


def _finish(db: Database, name: str, commit: bool) -> bool:
    """COMMIT or ROLLBACK PREPARED; False when someone else finished it meanwhile."""
    verb = "COMMIT" if commit else "ROLLBACK"
    try:
        db.execute(sa.text(f"{verb} PREPARED '{name}'"), idempotent=False)
    except sa.exc.DBAPIError as error:
        if sqlstate_of(error) != _UNDEFINED_OBJECT:
            raise
        return False
    return True


def _prune(first: Database, dbs: tuple[Database, ...]) -> int:
    """Remove the decisions nobody needs any more (module docstring)."""
    pruned = len(first.execute(_FORGET_OLD_ROLLBACKS).all())
    remaining: set[str] = set()
    for db in dbs:
        for (name,) in db.execute(_PREPARED):
            parsed = parse_gid(name)
            if parsed is not None:
                remaining.add(parsed[0])
    for transaction_id, parts in first.execute(_COMMITTED_ROWS).all():
        if transaction_id in remaining or parts > len(dbs):
            continue
        with _coordinator_gone(first, transaction_id) as gone:
            if gone:  # not a coordinator between its decision and its commits
                pruned += len(first.execute(_FORGET, {"id": transaction_id}).all())
    return pruned
