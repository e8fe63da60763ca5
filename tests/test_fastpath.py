"""The switch over dbkit's fast paths: by hand (environment, setting) and by itself, when
SQLAlchemy or psycopg is a version the seam was not tested on."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from dbkit import Database, fastpath
from dbkit.fastpath.pool import FastQueuePool
from dbkit.fastpath.psycopg import PgConnection
from dbkit.pool import CountingQueuePool


@pytest.fixture
def fresh_version_check() -> Iterator[None]:
    fastpath._libraries_supported.cache_clear()
    yield
    fastpath._libraries_supported.cache_clear()


def test_versions_outside_the_tested_range_are_named() -> None:
    assert fastpath.version_problem({"sqlalchemy": "2.1.9", "psycopg": "3.3.9"}) is None
    problem = fastpath.version_problem({"sqlalchemy": "2.2.0b1", "psycopg": "3.3.9"})
    assert problem is not None and "sqlalchemy 2.2.0b1" in problem and "2.0.30" in problem
    assert fastpath.version_problem({"sqlalchemy": "2.0.0", "psycopg": "3.3"}) is not None
    assert fastpath.version_problem({"sqlalchemy": "2.0.44", "psycopg": "4.0.0"}) is not None


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_the_environment_switches_them_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(fastpath.ENV_SWITCH, value)
    assert fastpath.enabled() is False
    monkeypatch.setenv(fastpath.ENV_SWITCH, "1")
    assert fastpath.enabled() is fastpath.enabled(True)
    assert fastpath.enabled(False) is False


def public_only(db: Database) -> bool:
    """Nothing of the seam is in use: SQLAlchemy's pool class, psycopg's connection, no
    driver path, no fast execute."""
    with db.transaction() as conn:
        driver = conn.connection.driver_connection
        fast_conn = type(conn).fast
    return (
        isinstance(db.engine.pool, CountingQueuePool)
        and not isinstance(db.engine.pool, FastQueuePool)
        and not isinstance(driver, PgConnection)
        and db.driver_path() is None
        and not fast_conn
    )


@pytest.mark.fast_path
def test_by_default_the_seam_is_used(db_url: str) -> None:
    with Database.from_url(db_url) as db:
        assert isinstance(db.engine.pool, FastQueuePool) and db.driver_path() is not None
        assert not public_only(db)


def test_the_setting_switches_them_off(db_url: str) -> None:
    with Database.from_url(db_url, fast_paths=False) as db:
        assert public_only(db)
        assert db.scalar(sa.select(sa.literal(41) + 1)) == 42


def test_an_untested_library_version_switches_them_off_with_one_warning(
    db_url: str, monkeypatch: pytest.MonkeyPatch, fresh_version_check: None
) -> None:
    monkeypatch.delenv(fastpath.ENV_SWITCH, raising=False)
    monkeypatch.setattr(fastpath, "_sqlalchemy_version", "2.2.0")
    with pytest.warns(fastpath.FastPathWarning, match=r"sqlalchemy 2\.2\.0 is outside"):
        first = Database.from_url(db_url).connect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not per Database
        second = Database.from_url(db_url).connect()
    with first, second:
        assert public_only(first) and public_only(second)
        with second.transaction():
            second.execute("CREATE TABLE t (id int)")
        assert second.execute(sa.text("SELECT count(*) AS n FROM t")).one().n == 0
