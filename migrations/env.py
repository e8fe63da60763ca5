"""Alembic environment for dbkit's own schema (``dbkit.schema.metadata``: the demo's tables).

The same as the env.py ``dbkit init`` writes for a project, with dbkit's tables as the
models: :func:`dbkit.migrate.run_env` runs every migration.  Where the database comes
from, first match wins:

1. ``config.attributes["connection"]``: the connection ``dbkit.migrate`` (``dbkit migrate``,
   ``dbkit demo``) hands over, used as is, in the caller's transaction; an ``Engine`` is
   connected here;
2. ``alembic -x url=...``, then ``sqlalchemy.url`` in alembic.ini (dbkit's leave it out);
3. dbkit's settings (``config/settings.toml``, ``DBKIT_*``, ``DATABASE_URL``).

With 2 and 3 (the plain ``alembic`` command) all revisions run in one transaction behind
dbkit's migration lock, as with ``dbkit migrate``.  Logging is configured from alembic.ini
only when the ``alembic`` command runs this file.  A caller may compare against other
models: ``dbkit.migrate.check(metadata=...)``.
"""

from __future__ import annotations

import dbkit.schema
from dbkit.migrate import run_env

run_env(dbkit.schema.metadata)
