"""Maintenance-database work: ``CREATE DATABASE``/``DROP DATABASE`` and the like, which
PostgreSQL refuses to run inside a transaction.

Shared by ``dbkit.local.LocalPostgres`` and the ``dbkit.testing`` plugin.  Deliberately
light (psycopg and SQLAlchemy's URL only): no pool, no ``Database``.  Errors are psycopg's
own (``psycopg.Error``); libpq's messages never contain the password.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import URL, make_url

__all__ = ["admin_connection", "create_database", "drop_database"]

# Seconds to wait for the server before giving up, unless the URL sets connect_timeout.
DEFAULT_CONNECT_TIMEOUT = 10


def _connect_args(url: str | URL) -> dict[str, Any]:
    """psycopg.connect() keywords for a SQLAlchemy URL, as SQLAlchemy's psycopg dialect
    makes them (query parameters such as ``sslmode`` and multiple hosts included)."""
    dialect = PGDialect_psycopg()  # type: ignore[no-untyped-call]
    _, params = dialect.create_connect_args(make_url(url))  # type: ignore[no-untyped-call]
    return dict(params)


def admin_connection(
    url: str | URL, *, connect_timeout: int = DEFAULT_CONNECT_TIMEOUT
) -> psycopg.Connection[TupleRow]:
    """An autocommit psycopg connection to the database of ``url`` (a SQLAlchemy URL, any
    ``postgresql+…`` driver name), usually a maintenance database such as ``postgres``.
    Use it as a context manager: ``with admin_connection(url) as conn: ...``."""
    params = {"connect_timeout": connect_timeout, **_connect_args(url)}
    return psycopg.connect(autocommit=True, **params)


def create_database(url: str | URL, name: str, *, template: str | None = None) -> None:
    """``CREATE DATABASE name`` on ``url``'s server, optionally ``TEMPLATE template``
    (whose sessions are ended first: PostgreSQL refuses to copy a database in use)."""
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    with admin_connection(url) as conn:
        if template:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (template,),
            )
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(query)


def drop_database(url: str | URL, name: str) -> None:
    """``DROP DATABASE IF EXISTS name`` on ``url``'s server, ending its sessions first
    (``WITH (FORCE)`` on PostgreSQL 13+)."""
    with admin_connection(url) as conn:
        if conn.info.server_version >= 130000:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            return
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (name,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
