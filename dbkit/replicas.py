"""Read replicas: which one a read may go to, so that reads spread over the replicas and
nobody reads a stale version of their own write.

Each replica is a ``Database`` of its own (its own pool, breaker and stats).  What dbkit
knows of it is kept here, refreshed by a background poller (one small query per replica
per ``poll_interval``): whether it answers, whether it is still in recovery (a promoted
replica is no replica), its replayed WAL position and its lag.  Lag means *replay is
behind*: a replica that has replayed all it received is not lagging however old its last
replayed transaction is (an idle primary).

Read-your-writes by WAL position: when this process may have committed a write since it
last looked (a flag set at every commit of a read-write transaction and every write
outside one: free), the next read routed to a replica first asks the primary for its
``pg_current_wal_insert_lsn()``, which is at or past every commit made so far.  A replica is
eligible only once its replayed position has reached that; when the cached position is
behind, the read asks the replica once (``pg_last_wal_replay_lsn()``) before giving up on
it, so a replica that caught up since the last poll is used at once.  Otherwise the read
goes to the primary (``read_from="prefer-replica"``) or fails with ``ConnectError``
(``"replica"``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from loguru import logger

from dbkit.health import ReplicaHealth

if TYPE_CHECKING:
    from dbkit.database import Database

__all__ = ["PRIMARY_POSITION", "Replica", "ReplicaSet", "parse_lsn"]

# One poll: is it a standby, what has it replayed, and how far is replay behind.
_POLL = (
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, "
    "CASE WHEN pg_last_wal_receive_lsn() IS NULL "
    "  OR pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0 "
    "ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END"
)
_REPLAYED = "SELECT pg_last_wal_replay_lsn()::text"
# The insert position, not the write one: with synchronous_commit off, COMMIT returns before
# its record is written out, and only the insert position is sure to be past it.
PRIMARY_POSITION = "SELECT pg_current_wal_insert_lsn()::text"


def parse_lsn(text: str | None) -> int | None:
    """``"16/B374D848"`` as an integer (its two 32-bit halves), comparable with ``<``."""
    if not text:
        return None
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


class Replica:
    """A replica's ``Database`` and what dbkit last learned of it."""

    def __init__(self, db: Database) -> None:
        self.db = db
        host, port = db.config.addresses()[0]
        self.name = f"replica:{host}:{port}"
        self.up = False  # answered the last poll as a standby
        self.replayed: int | None = None
        self.lag: float | None = None
        self.error: str | None = "not polled yet"
        self.polled_at = 0.0

    def poll(self) -> None:
        """Ask the replica how it is; never raises (a failure marks it down)."""
        try:
            row = self.db.execute(_POLL, idempotent=False).one()  # fail fast, no waiting
        except Exception as error:  # down, refused, breaker open …: skipped until it answers
            self.mark_down(error)
            return
        recovering, replayed, lag = row
        self.polled_at = time.monotonic()
        if not recovering:
            self.up, self.error = False, "not in recovery (promoted?): not a replica"
            return
        if not self.up:
            logger.info("{} is usable", self.name)
        self.up, self.error = True, None
        self.replayed, self.lag = parse_lsn(replayed), float(lag)

    def replayed_now(self) -> int | None:
        """The replayed position, asked now (a read's check when the cached one is behind)."""
        try:
            position = parse_lsn(self.db.scalar(_REPLAYED, idempotent=False))
        except Exception as error:
            self.mark_down(error)
            return None
        if position is not None and (self.replayed is None or position > self.replayed):
            self.replayed = position
        return position

    def mark_down(self, error: BaseException) -> None:
        if self.up:
            logger.warning("{} is skipped: {}", self.name, _one_line(error))
        self.up, self.error = False, _one_line(error)

    def health(self, max_lag: float) -> ReplicaHealth:
        ok = self.up and (self.lag or 0.0) <= max_lag
        error = self.error
        if self.up and not ok:
            error = f"replay is {self.lag:.1f}s behind (max_replica_lag {max_lag:g}s)"
        return ReplicaHealth(self.name, ok, self.lag if self.up else None, error)


class ReplicaSet:
    """The replicas of one primary ``Database`` and the routing of its reads."""

    def __init__(
        self,
        replicas: Sequence[Database],
        *,
        read_from: str,
        max_lag: float,
        primary_position: Callable[[], int | None],
        poll_interval: float | None = None,
    ) -> None:
        self.replicas = [Replica(db) for db in replicas]
        self.read_from = read_from
        self.max_lag = max_lag
        self._primary_position = primary_position
        # Fresh enough that lag is noticed well within max_replica_lag, at most once a second.
        self.poll_interval = poll_interval or min(1.0, max(0.1, max_lag / 4))
        self._turn = itertools.count()
        self._needed: int = 0  # the primary's position at or after this process's last commit
        self._dirty = False  # a commit may have happened since _needed was asked
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- writes ------------------------------------------------------------------------

    def wrote(self) -> None:
        """A write of this process committed: the next replica read checks the position."""
        self._dirty = True

    def _needed_position(self) -> int:
        if self._dirty:
            self._dirty = False  # before asking: a commit after this keeps it set
            position = self._primary_position()
            if position is None:  # could not ask: let the next read try again
                self._dirty = True
                raise LookupError("the primary's WAL position is unknown")
            with self._lock:
                self._needed = max(self._needed, position)
        return self._needed

    # -- reads -------------------------------------------------------------------------

    def choose(self) -> Replica | None:
        """A replica that may serve this process's next read, or None: up, within the
        lag, and caught up with this process's writes; taken in turn among those."""
        if self.read_from == "primary" or not self.replicas:
            return None
        try:
            needed = self._needed_position()
        except LookupError:
            return None
        usable = [r for r in self.replicas if r.up and (r.lag or 0.0) <= self.max_lag]
        if not usable:
            return None
        start = next(self._turn)
        ordered = [usable[(start + i) % len(usable)] for i in range(len(usable))]
        for replica in ordered:
            if replica.replayed is not None and replica.replayed >= needed:
                return replica
        for replica in ordered:  # the cache is behind: ask, once each
            replayed = replica.replayed_now()
            if replayed is not None and replayed >= needed:
                return replica
        return None

    def wait_caught_up(self, timeout: float) -> bool:
        """Until every replica that answers has replayed this process's latest commit."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                needed = self._needed_position()
            except LookupError:
                needed = None
            live = [r for r in self.replicas if r.up]
            if needed is not None and live and all((r.replayed_now() or 0) >= needed for r in live):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
            self.poll_all()

    # -- background --------------------------------------------------------------------

    def poll_all(self) -> None:
        for replica in self.replicas:
            replica.poll()

    def start(self) -> None:
        if self._poller is None and self.replicas:
            self.poll_all()
            self._poller = threading.Thread(target=self._run, name="dbkit-replicas", daemon=True)
            self._poller.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self.poll_all()

    def close(self) -> None:
        self._stop.set()
        poller, self._poller = self._poller, None
        if poller is not None and poller is not threading.current_thread():
            poller.join(timeout=5)
        for replica in self.replicas:
            replica.db.close()

    def health(self) -> tuple[ReplicaHealth, ...]:
        return tuple(r.health(self.max_lag) for r in self.replicas)


def _one_line(error: BaseException) -> str:
    orig = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(orig).strip().splitlines() if line.strip()]
    return "; ".join(lines) or type(orig).__name__
