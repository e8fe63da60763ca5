"""OpenTelemetry spans from real statements, collected in memory; never parameter values."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from dbkit import Database
from dbkit.otel import instrument


def test_statements_become_spans_without_values(db: Database) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrument(db, provider)
    db.execute("CREATE TABLE t (id int primary key, secret text)")
    db.execute("INSERT INTO t VALUES (1, :s)", {"s": "value-never-traced"})
    with pytest.raises(sa.exc.IntegrityError):
        db.execute("INSERT INTO t VALUES (1, 'x')")
    spans = exporter.get_finished_spans()
    assert [s.name.split()[0] for s in spans] == ["CREATE", "INSERT", "INSERT"]
    assert all(
        s.attributes is not None and s.attributes["db.system"] == "postgresql" for s in spans
    )
    assert all("value-never-traced" not in str(s.attributes) for s in spans)
    assert spans[1].status.status_code != StatusCode.ERROR
    assert spans[2].status.status_code == StatusCode.ERROR
    assert spans[0].end_time is not None and spans[0].start_time is not None
    assert spans[0].end_time >= spans[0].start_time
