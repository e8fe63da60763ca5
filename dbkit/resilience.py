"""Circuit breaker around making connections.

After ``failure_threshold`` consecutive *transient* connect failures (refused, timed out,
too many clients, starting up …) the breaker opens: new connections fail at once with
``CircuitOpenError`` instead of each caller waiting out its own connect timeout against a
server that is down.  After a while one caller is let through as a probe; its success
closes the breaker, its failure opens it again for twice as long.  The first wait is one
second and ``recovery_timeout`` caps them: a restart that takes a second costs about a
second, while a database that stays down is probed only every ``recovery_timeout``.

The lock guards state changes only, never the call itself (pybreaker's ``call()`` holds its
lock for the whole call and so serialises every caller).  Permanent errors (bad password,
unknown database) and pool exhaustion say nothing about the server's health and are not
counted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

from loguru import logger

from dbkit.errors import CircuitOpenError, is_transient

__all__ = ["BreakerState", "CircuitBreaker"]

# How long the breaker first stays open (capped by recovery_timeout); doubled per failed probe.
FIRST_OPEN = 1.0

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """A small, thread-safe breaker; ``failure_threshold=0`` disables it."""

    def __init__(
        self,
        failure_threshold: int = 5,
        recovery_timeout: float = 30.0,
        *,
        name: str = "database",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._open_for = 0.0  # how long this opening lasts before a probe
        self._probing = False
        self._bypassing = threading.local()
        self.times_opened = 0

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """Calls made by this thread inside go through even when the breaker is open, and
        their failures are not counted: for ``Database.connect()``, whose own retries are
        the waiting the breaker would do (a success still closes it)."""
        self._bypassing.on = True
        try:
            yield
        finally:
            self._bypassing.on = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._state == "open" and self._clock() - self._opened_at >= self._open_for:
                return "half_open"
            return self._state

    @property
    def enabled(self) -> bool:
        return self.failure_threshold > 0

    def before_call(self) -> None:
        """Let the call through, or raise ``CircuitOpenError``."""
        if not self.enabled or getattr(self._bypassing, "on", False):
            return
        with self._lock:
            if self._state == "closed":
                return
            waited = self._clock() - self._opened_at
            if self._state == "open" and waited < self._open_for:
                raise CircuitOpenError(
                    f"circuit breaker for {self.name} is open after {self._failures} "
                    f"consecutive connection failures; next attempt in "
                    f"{self._open_for - waited:.1f}s"
                )
            if self._probing:
                raise CircuitOpenError(
                    f"circuit breaker for {self.name} is half-open; a probe is under way"
                )
            self._state = "half_open"
            self._probing = True

    def record_success(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            was = self._state
            self._state = "closed"
            self._failures = 0
            self._probing = False
        if was != "closed":
            logger.bind(audit="breaker_closed").info(
                "circuit breaker for {} closed: the database answers again", self.name
            )

    def record_failure(self, error: BaseException) -> None:
        if not self.enabled or getattr(self._bypassing, "on", False):
            return
        if not is_transient(error):
            with self._lock:
                # Not the server's fault; a probe that failed this way still ends.
                self._probing = False
                if self._state == "half_open":
                    self._state = "closed"
            return
        opened = False
        with self._lock:
            self._failures += 1
            self._probing = False
            if self._state == "half_open" or self._failures >= self.failure_threshold:
                opened = self._state != "open"
                first = min(self.recovery_timeout, FIRST_OPEN)
                again = self._state == "half_open"
                self._open_for = min(self.recovery_timeout, self._open_for * 2) if again else first
                self._state = "open"
                self._opened_at = self._clock()
                if opened:
                    self.times_opened += 1
        if opened:
            logger.bind(audit="breaker_opened").warning(
                "circuit breaker for {} opened after {} consecutive failures: {}",
                self.name,
                self._failures,
                type(error).__name__,
            )

    @contextmanager
    def guard(self) -> Iterator[None]:
        """``with breaker.guard(): connect()`` — counts the outcome of the body."""
        self.before_call()
        try:
            yield
        except BaseException as error:
            self.record_failure(error)
            raise
        self.record_success()
