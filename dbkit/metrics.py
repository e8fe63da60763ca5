"""Statement observation: counts, latency histogram, errors by class, and the slow-query log.

The slow-query log shows the statement and its timing but never its parameter values
(they may be personal data or secrets) unless the application opts in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from loguru import logger
from sqlalchemy.engine import Dialect

from dbkit.errors import sqlstate_of
from dbkit.stats import QueryCounters

__all__ = ["StatementListener", "StatementObserver"]

# listener(seconds, error or None, sql_text()) after each statement; sql_text() renders the
# statement (never its parameter values) only if the listener asks for it.
StatementListener = Callable[[float, BaseException | None, Callable[[], str]], None]

P = ParamSpec("P")
R = TypeVar("R")
_clock = time.perf_counter


def _error_class(error: BaseException) -> str:
    state = sqlstate_of(error)
    return state[:2] if state else type(error).__name__


def _sql_text(statement: Any, dialect: Dialect) -> str:
    if isinstance(statement, str):
        return statement
    try:
        return str(statement.compile(dialect=dialect))
    except Exception:  # a statement that cannot compile alone (e.g. needs bound values)
        return type(statement).__name__


class StatementObserver:
    """Told about every statement run through a dbkit connection."""

    def __init__(
        self,
        counters: QueryCounters,
        slow_query_threshold: float = 0.0,
        log_slow_query_parameters: bool = False,
    ) -> None:
        self.counters = counters
        self.slow_query_threshold = slow_query_threshold
        self.log_slow_query_parameters = log_slow_query_parameters
        # Extra observers (e.g. dbkit.otel's tracer); none by default, so they cost nothing.
        self.listeners: list[StatementListener] = []

    def run(
        self,
        fn: Callable[P, R],
        statement: Any,
        parameters: Any,
        dialect: Dialect,
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """``fn(*args, **kwargs)``, timed and observed as one run of ``statement``: its
        result returned, or its exception observed and re-raised.  Only ``Exception``s count
        as a failed statement; a ``KeyboardInterrupt`` or the like propagates unobserved.

        The timing pattern of every caller in one place, kept cheap (no context manager, no
        closure): ``observer.run(method, statement, params, dialect, statement, params)``.
        """
        started = _clock()
        try:
            result = fn(*args, **kwargs)
        except Exception as error:
            self.observe(_clock() - started, error, statement, parameters, dialect)
            raise
        self.observe(_clock() - started, None, statement, parameters, dialect)
        return result

    def observe(
        self,
        seconds: float,
        error: BaseException | None,
        statement: Any,
        parameters: Any,
        dialect: Dialect,
    ) -> None:
        threshold = self.slow_query_threshold
        slow = threshold > 0 and seconds >= threshold
        self.counters.statement(seconds, None if error is None else _error_class(error), slow)
        for listener in self.listeners:
            try:
                listener(seconds, error, lambda: _sql_text(statement, dialect))
            except Exception as failure:  # an observer must never break the statement
                logger.opt(exception=failure).warning("statement listener failed")
        if slow:
            record = logger.bind(duration_ms=round(seconds * 1000, 3), slow_query=True)
            if self.log_slow_query_parameters:
                record = record.bind(parameters=repr(parameters))
            record.warning(
                "slow statement ({:.1f} ms): {}", seconds * 1000, _sql_text(statement, dialect)
            )
