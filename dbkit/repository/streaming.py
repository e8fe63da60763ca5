"""``repo.stream()`` on a psycopg server-side cursor (``DECLARE … CURSOR``, then ``FETCH
FORWARD batch_size``): plain tuples, flat memory however many rows.  SQLAlchemy's
``yield_per`` does the same through its result machinery, a little slower; it is used when
fast paths are off or cursor-level listeners must see the statement."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import psycopg
import sqlalchemy as sa

from dbkit.fastpath.sqlalchemy import (
    bound_parameters,
    processed,
    result_processors,
    wrap_driver_error,
)

if TYPE_CHECKING:
    from dbkit.connection import DbkitConnection

__all__ = ["driver_stream"]

_cursor_names = itertools.count(1)


def _observe(
    conn: DbkitConnection, started: float, error: BaseException | None, sql: str, params: Any
) -> None:
    observer = conn.observer
    if observer is not None:
        observer.observe(time.perf_counter() - started, error, sql, (params,), conn.dialect)


def driver_stream(
    conn: DbkitConnection,
    stmt: sa.Select[Any],
    columns: Sequence[sa.Column[Any]],
    batch_size: int,
) -> Iterator[Sequence[Sequence[Any]]]:
    """Batches of plain tuples from a psycopg server-side cursor (``DECLARE … CURSOR`` then
    ``FETCH FORWARD batch_size``), closed when the generator is."""
    dialect = conn.dialect
    compiled = stmt.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    params = bound_parameters(compiled)
    sql = compiled.string
    driver = conn.connection.driver_connection
    assert driver is not None
    started = time.perf_counter()
    observed = False
    try:
        with driver.cursor(name=f"dbkit_stream_{next(_cursor_names)}") as cursor:
            # Observed once, with the first batch: as SQLAlchemy's yield_per path, whose
            # execute() fetches the first rows, so both count the same statements and errors.
            cursor.execute(sql, params)
            rows = cursor.fetchmany(batch_size)
            observed = True
            _observe(conn, started, None, sql, params)
            processors = result_processors(columns, cursor.description or (), dialect)
            while rows:
                yield processed(rows, processors) if processors else rows
                rows = cursor.fetchmany(batch_size)
    except psycopg.Error as error:
        wrapped = wrap_driver_error(conn, error, sql, params)
        if not observed:
            _observe(conn, started, wrapped, sql, params)
        raise wrapped from error
