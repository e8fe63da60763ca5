"""The durable part of two-phase commit: the names of prepared parts, the decision log, and
what a participant must allow.

- A part's gid is ``dbkit:<id>:<n>``: the distributed transaction's id (a UUID the
  coordinator draws) and the part's number; recovery groups prepared transactions by id
  and leaves every gid of another shape alone.
- The decision log is the table ``dbkit_twophase_log`` on the coordinator's first
  database, created on first use (``LOG_DDL``; a migration may create it instead).  A row
  ``(id, 'commit')`` written before any ``COMMIT PREPARED`` is the decision; a row
  ``(id, 'rollback')`` is recovery's.  The primary key makes them exclusive: whoever
  writes first decides, and the other sees it.
- While it runs, the coordinator holds a session advisory lock on the first database,
  keyed by the id: recovery touches a transaction only when it can take that lock (its
  coordinator is gone), so a running coordinator is never split.
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import TYPE_CHECKING

import sqlalchemy as sa

from dbkit.errors import TransactionError
from dbkit.locks import advisory_key

if TYPE_CHECKING:
    from dbkit.database import Database

__all__ = [
    "LOG_DDL",
    "LOG_TABLE",
    "coordinator_key",
    "ensure_log",
    "gid",
    "parse_gid",
    "require_prepared_transactions",
]

LOG_TABLE = "dbkit_twophase_log"
LOG_DDL = f"""CREATE TABLE IF NOT EXISTS {LOG_TABLE} (
    id text PRIMARY KEY,
    outcome text NOT NULL CHECK (outcome IN ('commit', 'rollback')),
    parts integer NOT NULL CHECK (parts > 0),
    decided_at timestamptz NOT NULL DEFAULT now()
)"""
_GID = re.compile(r"dbkit:([0-9a-f]{32}):(\d+)")

# Databases known to have the log table / allow prepared transactions (per object: the
# answer cannot change without a server restart or a DROP, which recovery survives).
_logged: weakref.WeakSet[Database] = weakref.WeakSet()
_capable: weakref.WeakSet[Database] = weakref.WeakSet()
_lock = threading.Lock()


def gid(transaction_id: str, part: int) -> str:
    return f"dbkit:{transaction_id}:{part}"


def parse_gid(text: str) -> tuple[str, int] | None:
    """``(id, part)`` of a dbkit gid, None for anybody else's."""
    match = _GID.fullmatch(text)
    return None if match is None else (match.group(1), int(match.group(2)))


def coordinator_key(transaction_id: str) -> int:
    return advisory_key(f"dbkit.twophase {transaction_id}")


def ensure_log(db: Database) -> None:
    """Create the decision log on ``db`` unless it is known to be there."""
    if db in _logged:
        return
    try:
        db.execute(sa.text(LOG_DDL))
    except sa.exc.IntegrityError:
        # Two sessions creating it at once: one wins the catalog row, the other sees it.
        db.execute(sa.text(LOG_DDL))
    with _lock:
        _logged.add(db)


def require_prepared_transactions(db: Database) -> None:
    """``TransactionError`` when ``db``'s server refuses PREPARE TRANSACTION."""
    if db in _capable:
        return
    allowed = int(db.scalar(sa.text("SELECT current_setting('max_prepared_transactions')")))
    if allowed <= 0:
        raise TransactionError(
            f"{db.config.safe_dsn()} has max_prepared_transactions = 0, so it cannot take "
            "part in a distributed transaction: set it above 0 (at least the number of "
            "distributed transactions that may be in flight at once) and restart the server"
        )
    with _lock:
        _capable.add(db)
