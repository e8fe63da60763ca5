"""Prometheus exposition of a Database's pool and query metrics (extra: ``dbkit[prometheus]``).

A custom collector reads ``db.stats()`` and ``db.query_stats()`` at scrape time, so the hot
path pays nothing for it.  Metric names follow Go's ``database/sql`` collectors
(``go_sql_*`` in prometheus/client_golang) with a ``dbkit_`` prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

if TYPE_CHECKING:
    from dbkit.database import Database

__all__ = ["DatabaseCollector", "register_metrics"]


# PoolStats field → (metric family, help text); gauges are levels, counters only grow.
_POOL_METRICS: dict[str, tuple[type[GaugeMetricFamily] | type[CounterMetricFamily], str]] = {
    "max_open_connections": (GaugeMetricFamily, "Maximum open connections (0 = unlimited)."),
    "open_connections": (GaugeMetricFamily, "Open connections, in use and idle."),
    "in_use": (GaugeMetricFamily, "Connections currently checked out."),
    "idle": (GaugeMetricFamily, "Idle connections in the pool."),
    "wait_count": (CounterMetricFamily, "Checkouts that had to wait for a connection."),
    "wait_timeouts": (CounterMetricFamily, "Checkouts that gave up after the pool timeout."),
    "max_idle_closed": (CounterMetricFamily, "Closed because max_idle_conns was reached."),
    "max_idle_time_closed": (CounterMetricFamily, "Closed for exceeding conn_max_idle_time."),
    "max_lifetime_closed": (CounterMetricFamily, "Closed for exceeding conn_max_lifetime."),
    "connects": (CounterMetricFamily, "Physical connections made."),
    "invalidated": (CounterMetricFamily, "Dead connections found and replaced."),
}


class DatabaseCollector(Collector):
    """Yields one database's metrics, labelled ``db=<name>``."""

    def __init__(self, db: Database, name: str | None = None) -> None:
        self._db = db
        self._name = name or db.config.name

    def collect(self) -> Iterator[Metric]:
        label = ["db"]
        value = [self._name]
        # One series per pool: "primary" and each "replica:<host>:<port>".
        pools = self._db.pool_stats()
        for field, (family, doc) in _POOL_METRICS.items():
            metric = family(f"dbkit_pool_{field}", doc, labels=[*label, "pool"])
            for pool_name, pool in pools.items():
                metric.add_metric([*value, pool_name], getattr(pool, field))
            yield metric
        waited = CounterMetricFamily(
            "dbkit_pool_wait_duration_seconds",
            "Time spent waiting for a connection.",
            labels=[*label, "pool"],
        )
        for pool_name, pool in pools.items():
            waited.add_metric([*value, pool_name], pool.wait_duration)
        yield waited
        replicas = self._db.replica_states()
        if replicas:
            up = GaugeMetricFamily(
                "dbkit_replica_usable",
                "1 while the replica answers within max_replica_lag.",
                labels=[*label, "pool"],
            )
            lag = GaugeMetricFamily(
                "dbkit_replica_lag_seconds",
                "Seconds of replay behind (NaN while it does not answer).",
                labels=[*label, "pool"],
            )
            for replica in replicas:
                up.add_metric([*value, replica.name], 1 if replica.ok else 0)
                lag.add_metric(
                    [*value, replica.name], float("nan") if replica.lag_s is None else replica.lag_s
                )
            yield up
            yield lag

        queries = self._db.query_stats()
        histogram = HistogramMetricFamily(
            "dbkit_statement_duration_seconds", "Statement latency.", labels=label
        )
        histogram.add_metric(
            value, list(queries.latency_buckets.items()), sum_value=queries.total_seconds
        )
        yield histogram
        errors = CounterMetricFamily(
            "dbkit_statement_errors",
            "Failed statements by SQLSTATE class.",
            labels=[*label, "class"],
        )
        for error_class, count in sorted(queries.errors_by_class.items()):
            errors.add_metric([*value, error_class], count)
        yield errors
        slow = CounterMetricFamily(
            "dbkit_slow_statements", "Statements over slow_query_threshold.", labels=label
        )
        slow.add_metric(value, queries.slow_statements)
        yield slow
        transactions = CounterMetricFamily(
            "dbkit_transactions", "Outermost transactions by outcome.", labels=[*label, "outcome"]
        )
        for outcome in ("committed", "rolled_back", "retried"):
            transactions.add_metric([*value, outcome], getattr(queries, f"transactions_{outcome}"))
        yield transactions
        breaker = GaugeMetricFamily(
            "dbkit_circuit_breaker_open",
            "1 while the connect circuit breaker is open.",
            labels=label,
        )
        breaker.add_metric(value, 0 if self._db.breaker.state == "closed" else 1)
        yield breaker


def register_metrics(
    db: Database, registry: CollectorRegistry = REGISTRY, name: str | None = None
) -> DatabaseCollector:
    """Expose ``db``'s metrics on ``registry`` (the default one unless given)."""
    collector = DatabaseCollector(db, name)
    registry.register(collector)
    return collector
