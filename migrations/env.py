"""Alembic environment for dbkit's Core schema (``dbkit.schema.metadata``).

Where the database comes from, first match wins:

1. ``config.attributes["connection"]``: a ``Connection`` is used as is, in the caller's
   transaction (``dbkit.migrate`` passes one); an ``Engine`` is connected here.
2. ``alembic -x url=...``.
3. ``sqlalchemy.url`` in alembic.ini (dbkit's own file leaves it out).
4. dbkit's settings (``config/settings.toml``, ``DBKIT_*``, ``DATABASE_URL``).

Logging is configured from alembic.ini only when the ``alembic`` command runs this file; a
library caller sets ``config.attributes["configure_logging"] = False`` and keeps its own.
"""

from __future__ import annotations

import importlib.util
from logging.config import fileConfig
from typing import Any

import sqlalchemy as sa
from alembic import context

import dbkit.schema

config = context.config

if config.attributes.get("configure_logging", True) and config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# A caller may compare against other metadata (dbkit.migrate.check(metadata=...)).
target_metadata = config.attributes.get("target_metadata", dbkit.schema.metadata)


def _configure_options() -> dict[str, Any]:
    options: dict[str, Any] = {
        "target_metadata": target_metadata,
        "compare_type": True,
        "compare_server_default": True,
    }
    # Named CHECK constraints are compared only with this opt-in plugin (alembic >= 1.19.2).
    if importlib.util.find_spec("alembic.ext.checkconstraint_byname") is not None:
        options["autogenerate_plugins"] = [
            "alembic.autogenerate.*",
            "alembic.ext.checkconstraint_byname",
        ]
    return options


def _url() -> str:
    x_args = context.get_x_argument(as_dictionary=True)
    if x_args.get("url"):
        return x_args["url"]
    ini_url = config.get_main_option("sqlalchemy.url")
    if ini_url:
        return ini_url
    from dbkit.settings import load_settings

    url = load_settings().database.postgres.url()
    return url.render_as_string(hide_password=False)


def _run(connection: sa.Connection) -> None:
    context.configure(connection=connection, **_configure_options())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the DDL instead of running it."""
    context.configure(url=_url(), literal_binds=True, **_configure_options())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if isinstance(given, sa.Connection):
        _run(given)
        return
    engine = (
        given
        if isinstance(given, sa.Engine)
        else sa.create_engine(_url(), poolclass=sa.pool.NullPool)
    )
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        if engine is not given:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
