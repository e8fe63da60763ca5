"""The fault thread: after the calm phase, at random intervals, one fault at a time.

Kinds: ``cut_all``, ``cut_after_commit``, ``cut_instead_of_commit`` (the proxy) and
``terminate`` (``pg_terminate_backend`` of the workers' backends, from a direct
connection), each once per round of four, in a random order.  Unless switched off,
``restart_fast`` / ``restart_immediate`` on their own schedule, in turn: the server is
stopped in that mode, stays down ``downtime`` seconds (the proxy still accepts, and resets
every connection it cannot pass on), and is started again on the same port with the same
data.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from dbkit.local import LocalPostgres

from ..faultproxy import FaultProxy

__all__ = ["PROXY_KINDS", "RESTART_KINDS", "FaultEvent", "FaultThread"]

PROXY_KINDS = ("cut_all", "cut_after_commit", "cut_instead_of_commit", "terminate")
RESTART_KINDS = ("restart_fast", "restart_immediate")


@dataclass
class FaultEvent:
    """One fault; times are seconds since the soak started.  For a restart, ``down`` is
    when the server was stopped and ``up`` when it answered again."""

    kind: str
    at: float
    done: float
    detail: str = ""
    down: float | None = None
    up: float | None = None


class FaultThread(threading.Thread):
    def __init__(
        self,
        server: LocalPostgres,
        proxy: FaultProxy,
        *,
        clock: Callable[[], float],
        calm: float,
        fault_every: float,
        restart_every: float | None,
        downtime: float,
        application_name: str,
        dbname: str,
        seed: int,
    ) -> None:
        super().__init__(name="chaos-faults", daemon=True)
        self.server = server
        self.proxy = proxy
        self.clock = clock
        self.calm = calm
        self.fault_every = fault_every
        self.restart_every = restart_every
        self.downtime = downtime
        self.application_name = application_name
        self.dbname = dbname
        self.rng = random.Random(seed)
        self.events: list[FaultEvent] = []
        self.error: str | None = None  # traceback of an exception that stopped the thread
        self._stop_event = threading.Event()

    def stop(self, timeout: float = 120.0) -> None:
        """No new fault; wait for the one under way (a restart takes a few seconds)."""
        self._stop_event.set()
        self.join(timeout)
        if self.is_alive() and self.error is None:
            self.error = f"the fault thread did not stop within {timeout:g}s"

    def _interval(self, mean: float) -> float:
        return self.rng.uniform(0.5 * mean, 1.5 * mean)

    def run(self) -> None:
        try:
            self._run()
        except BaseException:  # recorded: fails the run, never dropped
            self.error = traceback.format_exc()

    def _run(self) -> None:
        if self._stop_event.wait(max(0.0, self.calm - self.clock())):
            return
        now = self.clock()
        next_fault = now + self._interval(self.fault_every)
        next_restart = (
            now + self._interval(self.restart_every) if self.restart_every is not None else None
        )
        restarts = 0
        kinds: list[str] = []
        while True:
            restart_due = next_restart is not None and next_restart <= next_fault
            due = next_restart if restart_due and next_restart is not None else next_fault
            if self._stop_event.wait(max(0.0, due - self.clock())):
                return
            if restart_due and self.restart_every is not None:
                self._restart(RESTART_KINDS[restarts % 2])
                restarts += 1
                next_restart = self.clock() + self._interval(self.restart_every)
                next_fault = max(next_fault, self.clock())
            else:
                if not kinds:  # every kind once per round, in a random order
                    kinds = self.rng.sample(PROXY_KINDS, len(PROXY_KINDS))
                self._fault(kinds.pop())
                next_fault = self.clock() + self._interval(self.fault_every)

    def _fault(self, kind: str) -> None:
        at = self.clock()
        if kind == "cut_all":
            detail = f"{self.proxy.cut_all()} connection(s)"
        elif kind == "cut_after_commit":
            self.proxy.cut_after_commit(1)
            detail = "next COMMIT"
        elif kind == "cut_instead_of_commit":
            self.proxy.cut_instead_of_commit(1)
            detail = "next COMMIT"
        else:
            detail = f"{self._terminate()} backend(s)"
        self.events.append(FaultEvent(kind, at, self.clock(), detail))

    def _terminate(self) -> int:
        with self.server.admin_connection() as conn:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = %s AND datname = %s AND pid <> pg_backend_pid()",
                (self.application_name, self.dbname),
            ).fetchone()
        return int(row[0]) if row else 0

    def _restart(self, kind: str) -> None:
        mode = kind.removeprefix("restart_")
        at = self.clock()
        self.server.stop(mode=mode)  # a kept data directory: stop() leaves the data
        down = self.clock()
        time.sleep(self.downtime)
        self.server.start()
        up = self.clock()
        self.events.append(FaultEvent(kind, at, up, f"down {up - at:.2f}s", down, up))
