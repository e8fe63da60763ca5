"""The Alembic environment of dbkit's own schema (``dbkit.schema``: the demo's tables).

In the repository this directory sits at the top, beside ``alembic.ini``; the package
ships it as ``dbkit.migrations`` (pyproject.toml maps it), with its own small
``alembic.ini``, so ``dbkit demo`` finds it in any installation:
``dbkit.migrate.packaged_alembic_ini()``.  Nothing here is imported by dbkit's code;
Alembic loads ``env.py`` and ``versions/`` by path.
"""
