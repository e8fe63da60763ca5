"""Prometheus exposition: real metric values after real work, parsed back from the text."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dbkit import Database
from dbkit.prometheus import register_metrics


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_pool_and_query_metrics_are_exposed(db: Database) -> None:
    registry = CollectorRegistry()
    register_metrics(db, registry, name="main")
    db.execute("CREATE TABLE t (id int primary key)")
    with db.transaction() as conn:
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))
    with pytest.raises(sa.exc.IntegrityError):
        db.execute("INSERT INTO t VALUES (1)")
    got = samples(registry)
    main = (("db", "main"),)
    pool = (("db", "main"), ("pool", "primary"))
    assert got[("dbkit_pool_open_connections", pool)] == db.stats().open_connections >= 1
    assert got[("dbkit_pool_in_use", pool)] == 0
    statements = db.query_stats().statements  # connect()'s probe, then the three above
    assert got[("dbkit_statement_duration_seconds_count", main)] == statements == 4
    assert got[("dbkit_statement_errors_total", (("class", "23"), ("db", "main")))] == 1
    assert got[("dbkit_transactions_total", (("db", "main"), ("outcome", "committed")))] == 1
    assert got[("dbkit_circuit_breaker_open", main)] == 0
