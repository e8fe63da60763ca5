"""Task runner: `nox` runs lint, typecheck and tests; `nox -s bench` runs the benchmarks."""

import nox

nox.needs_version = ">=2024.10.9"
nox.options.default_venv_backend = "uv|venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "typecheck", "tests", "tests_public_api", "tests_sqlalchemy20"]

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test,prometheus,otel]", "opentelemetry-sdk")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def tests_public_api(session: nox.Session) -> None:
    """The whole suite with dbkit's fast paths off (DBKIT_FAST_PATHS=0): SQLAlchemy's and
    psycopg's public API only, as after an upgrade to versions the seam was not tested on.
    Results, errors, events and statistics must be the same; only the speed differs."""
    session.install("-e", ".[test,prometheus,otel]", "opentelemetry-sdk")
    session.run("pytest", *session.posargs, env={"DBKIT_FAST_PATHS": "0"})


@nox.session(python=PYTHON)
def tests_sqlalchemy20(session: nox.Session) -> None:
    """The suite on SQLAlchemy 2.0, the oldest minor we accept: dbkit's driver-level paths call
    some of SQLAlchemy's private API (compiled cache, execution context), which 2.1 moved."""
    session.install("-e", ".[test,prometheus,otel]", "opentelemetry-sdk", "SQLAlchemy>=2.0.30,<2.1")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "dbkit", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "dbkit", "tests", "noxfile.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test,lint,prometheus,otel]", "opentelemetry-sdk")
    session.run("mypy")


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """`nox -s bench -- --quick`, `-- --only stream`: arguments go to `python -m tests.bench`.
    The bench extra brings the other contenders (psycopg-pool, dataset 2, which runs on
    SQLAlchemy 2 beside dbkit in this one environment)."""
    session.install("-e", ".[test,bench]")
    session.run("python", "-m", "tests.bench", *session.posargs)


@nox.session(python=PYTHON, default=False)
def chaos(session: nox.Session) -> None:
    """`nox -s chaos -- --seconds 120 --no-restarts`: arguments go to `python -m tests.chaos`,
    a bank-transfer soak through a fault proxy (cuts, lost COMMITs, terminated backends,
    server restarts) that checks dbkit never reports a commit wrongly."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "tests.chaos", "--seconds", "40", *session.posargs)
