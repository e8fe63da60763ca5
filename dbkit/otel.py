"""OpenTelemetry spans for dbkit statements (extra: ``dbkit[otel]``).

``instrument(db)`` adds one statement listener; a Database that is not instrumented pays
nothing.  Spans follow the database semantic conventions (``db.system``,
``db.query.text`` …) and never carry parameter values.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode, TracerProvider

if TYPE_CHECKING:
    from dbkit.database import Database

__all__ = ["instrument"]


def instrument(db: Database, tracer_provider: TracerProvider | None = None) -> None:
    """Emit a client span for every statement ``db`` runs."""
    tracer = trace.get_tracer("dbkit", tracer_provider=tracer_provider)
    config = db.config
    attributes: dict[str, str | int] = {
        "db.system": "postgresql",
        "db.namespace": config.name,
        "server.address": config.host,
        "server.port": config.port,
    }

    def on_statement(seconds: float, error: BaseException | None, sql: Callable[[], str]) -> None:
        ended = time.time_ns()
        text = sql()
        operation = text.split(None, 1)[0].upper() if text.strip() else "statement"
        span = tracer.start_span(
            f"{operation} {config.name}",
            kind=trace.SpanKind.CLIENT,
            start_time=ended - int(seconds * 1e9),
            attributes={**attributes, "db.operation.name": operation, "db.query.text": text},
        )
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end(end_time=ended)

    db.add_statement_listener(on_statement)
