"""`dbkit demo` through its real entry point: on a configured database with the counts
checked in it, on the embedded default, and interrupted half-way (SIGINT, SIGTERM) then run
again: whole chunks only, no duplicates, the throwaway server stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from cli_helpers import one_line, run_dbkit
from users_project import make_users_project, users_migrations_ran

import dbkit
from dbkit import demo
from dbkit.cli import DEMO_LOCK

PROJECT = Path(__file__).resolve().parent.parent


def plain(url: str) -> str:
    return url.replace("+psycopg", "")


def is_valid(record: demo.StagedUser) -> bool:
    return record.email is not None and "@" in record.email


def migrated(url: str) -> str:
    result = run_dbkit("migrate", "upgrade", "--url", url)
    assert result.returncode == 0, result.stderr
    return url


def counts(url: str) -> dict[str, int]:
    with psycopg.connect(plain(url)) as conn:
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
            for table in ("users", "users_staging", "import_rejects", "health_checks")
        }


def expected_counts(n: int) -> tuple[int, int]:
    """(distinct valid emails, invalid records) of ``demo.generate(n)``."""
    records = list(demo.generate(n))
    return len({r.email for r in records if is_valid(r)}), sum(not is_valid(r) for r in records)


def committed_chunks(url: str, n: int, chunk: int) -> int:
    """How many chunks are in the database, checking that each chunk is there whole or not
    at all, that the ones there are the first ones, and that nothing is there twice."""
    with psycopg.connect(plain(url)) as conn:
        present = {row[0] for row in conn.execute("SELECT email FROM users")}
        lines = [row[0] for row in conn.execute("SELECT line FROM import_rejects")]
    assert len(lines) == len(set(lines)), "a rejected record recorded twice"
    rejected = set(lines)
    records = list(demo.generate(n))
    last = {r.email: r.line for r in records}  # the record of an email that counts
    seen: set[str | None] = set()
    states = []
    for start in range(0, n, chunk):
        part = records[start : start + chunk]
        new = {r.email for r in part if is_valid(r) and last[r.email] == r.line}
        seen |= new  # the users this chunk creates
        marks = [email in present for email in new]
        marks += [r.line in rejected for r in part if not is_valid(r)]
        assert all(marks) or not any(marks), f"chunk {start // chunk} is half-written"
        states.append(all(marks))
    assert present <= seen, "users that no input record names"
    assert states == sorted(states, reverse=True), f"chunks committed out of order: {states}"
    return sum(states)


def test_demo_on_a_configured_database_then_again(db_url: str) -> None:
    migrated(db_url)
    first = run_dbkit("demo", "--url", db_url, "--rows", "3000", "--chunk-size", "700")
    assert first.returncode == 0, first.stderr
    users, invalid = expected_counts(3000)
    assert counts(db_url) == {
        "users": users,
        "users_staging": 3000,
        "import_rejects": invalid,
        "health_checks": 1,
    }
    assert re.search(rf"rejected +{invalid} rows", first.stdout)
    assert re.search(rf"users +{users} in the table", first.stdout)
    assert "merge: 3000 rows in" in first.stdout  # plain progress lines: not a terminal

    # Idempotent, and DATABASE_URL names a database as well as --url does.
    again = run_dbkit("demo", "--rows", "3000", env={"DATABASE_URL": db_url})
    assert again.returncode == 0, again.stderr
    assert f"database    {plain(db_url)}" in again.stdout
    assert counts(db_url) == {
        "users": users,
        "users_staging": 3000,
        "import_rejects": invalid,
        "health_checks": 2,
    }


def test_demo_reads_a_csv(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text("email,name\nann@example.com,Ann\nbob-at-example.com,Bob\n")
    result = run_dbkit("demo", "--url", migrated(db_url), "--csv", str(path))
    assert result.returncode == 0, result.stderr
    assert counts(db_url)["users"] == 1
    with psycopg.connect(plain(db_url)) as conn:
        rejects = conn.execute("SELECT line, email, reason FROM import_rejects").fetchall()
    assert rejects == [(3, "bob-at-example.com", "violates ck_users_email_has_at")]

    path.write_text("mail\nx@y.z\n")
    bad = run_dbkit("demo", "--url", db_url, "--csv", str(path))
    assert bad.returncode == 1 and "'email' column" in one_line(bad.stderr)
    assert counts(db_url)["users_staging"] == 2  # the earlier load, untouched
    missing = run_dbkit("demo", "--url", db_url, "--csv", str(tmp_path / "none.csv"))
    assert missing.returncode == 2 and "no such file" in one_line(missing.stderr)


def test_demo_refuses_a_database_that_is_not_migrated(db_url: str) -> None:
    result = run_dbkit("demo", "--url", db_url, "--rows", "10")
    assert result.returncode == 1
    reason = one_line(result.stderr)
    assert "run `dbkit migrate upgrade` first" in reason
    assert str(demo.alembic_ini()) in reason  # the demo's own migrations, named


def test_demo_on_a_database_migrated_with_the_demos_own_migrations(
    db_url: str, tmp_path: Path
) -> None:
    # As the refusal says, from anywhere (here a user's project with other migrations).
    project = make_users_project(tmp_path / "orders")
    ini = str(demo.alembic_ini())
    migrated = run_dbkit("migrate", "upgrade", "--ini", ini, "--url", db_url, cwd=project)
    assert migrated.returncode == 0, migrated.stderr
    result = run_dbkit("demo", "--url", db_url, "--rows", "300", cwd=project)
    assert result.returncode == 0, result.stderr
    assert counts(db_url)["users_staging"] == 300
    assert not users_migrations_ran(project)


def test_demo_on_a_server_that_is_down(free_port: int) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port}/postgres"
    env = {"DBKIT_DATABASE__POSTGRES__MAX_RETRIES": "0"}
    result = run_dbkit("demo", "--url", url, "--rows", "10", env=env)
    assert result.returncode == 1
    assert one_line(result.stderr).startswith("dbkit demo: cannot connect")


def throwaway_server(stdout: str) -> tuple[str, Path]:
    """The URL and data directory the embedded default reported."""
    found = re.search(r"throwaway local PostgreSQL (\S+)\n\s+in (\S+), stopped", stdout)
    assert found, stdout
    return found.group(1), Path(found.group(2))


def assert_stopped_and_removed(url: str, data_dir: Path) -> None:
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(plain(url), connect_timeout=3)
    assert not data_dir.exists() and not data_dir.parent.exists()


def test_demo_with_nothing_configured_uses_a_throwaway_server(tmp_path: Path) -> None:
    # No config dir in the working directory, no DATABASE_URL, no DBKIT_* variables.
    result = run_dbkit("demo", "--rows", "1500", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    url, data_dir = throwaway_server(result.stdout)
    users, invalid = expected_counts(1500)
    assert re.search(rf"users +{users} in the table", result.stdout)
    assert re.search(rf"rejected +{invalid} rows", result.stdout)
    assert "health      ok" in result.stdout
    assert_stopped_and_removed(url, data_dir)


def test_demo_inside_a_users_project_uses_its_own_schema(tmp_path: Path) -> None:
    # The project's alembic.ini and settings are the user's: the demo takes neither.
    project = make_users_project(tmp_path / "orders")
    result = run_dbkit("demo", "--rows", "1500", cwd=project)
    assert result.returncode == 0, result.stderr
    users, _ = expected_counts(1500)
    assert re.search(rf"users +{users} in the table", result.stdout)
    assert not users_migrations_ran(project)
    assert_stopped_and_removed(*throwaway_server(result.stdout))


def test_demo_project_defaults_do_not_count_as_configured() -> None:
    # In the project, config/settings.toml names localhost:5432: defaults, not a choice.
    result = run_dbkit("demo", "--rows", "200", cwd=PROJECT)
    assert result.returncode == 0, result.stderr
    assert_stopped_and_removed(*throwaway_server(result.stdout))


def test_demo_without_binaries_says_how_to_get_them(tmp_path: Path) -> None:
    result = run_dbkit("demo", "--rows", "10", cwd=tmp_path, env={"DBKIT_PG_BIN": str(tmp_path)})
    assert result.returncode == 1
    reason = one_line(result.stderr)
    assert "apt-get install postgresql" in reason and "DATABASE_URL" in reason


def start_demo(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBKIT_")}
    env.pop("DATABASE_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "dbkit", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def interrupt_during_merge(
    process: subprocess.Popen[str], sig: int, after_rows: int = 0
) -> tuple[str, str]:
    """Send ``sig`` once the merge phase reports ``after_rows`` done; the output."""
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("merge: ") and int(line.split()[1].split("/")[0]) >= after_rows:
            process.send_signal(sig)
            break
    out, err = process.communicate(timeout=120)
    return "".join(lines) + out, err


def test_demo_interrupted_half_way_keeps_whole_chunks_and_completes_when_rerun(
    db_url: str,
) -> None:
    rows, chunk = 40_000, 2_000
    url = migrated(db_url)
    # Each chunk's statement takes a quarter of a second more, so that the interruption
    # lands half-way on any machine: the merge itself is too fast to aim at.
    with psycopg.connect(plain(db_url), autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION slow_chunk() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "PERFORM pg_sleep(0.25); RETURN NULL; END $$"
        )
        conn.execute(
            "CREATE TRIGGER slow_chunk AFTER INSERT ON users FOR EACH STATEMENT "
            "EXECUTE FUNCTION slow_chunk()"
        )
    process = start_demo("--url", url, "--rows", str(rows), "--chunk-size", "2000")
    out, err = interrupt_during_merge(process, signal.SIGINT, after_rows=8_000)
    assert process.returncode == 130, out + err
    assert one_line(err) == "dbkit demo: interrupted"
    done = committed_chunks(db_url, rows, chunk)
    assert 4 <= done < rows // chunk, f"{done} chunks: not interrupted half-way"
    with psycopg.connect(plain(db_url), autocommit=True) as conn:
        conn.execute("DROP TRIGGER slow_chunk ON users")

    again = run_dbkit("demo", "--url", db_url, "--rows", str(rows), "--chunk-size", "2000")
    assert again.returncode == 0, again.stderr
    assert committed_chunks(db_url, rows, chunk) == rows // chunk
    users, invalid = expected_counts(rows)
    assert counts(db_url) == {
        "users": users,
        "users_staging": rows,
        "import_rejects": invalid,
        "health_checks": 1,
    }


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_demo_stops_its_throwaway_server(tmp_path: Path, sig: int, code: int) -> None:
    process = start_demo("--rows", "100000", cwd=tmp_path)
    out, err = interrupt_during_merge(process, sig)
    assert process.returncode == code, out + err
    assert one_line(err) in ("dbkit demo: interrupted", "dbkit demo: terminated")
    assert_stopped_and_removed(*throwaway_server(out))


def test_a_second_demo_against_the_same_database_does_not_start(db_url: str) -> None:
    migrated(db_url)
    first = run_dbkit("demo", "--url", db_url, "--rows", "300")
    assert first.returncode == 0, first.stderr
    before = counts(db_url)
    assert before["users_staging"] == 300
    # A demo running: it holds the demo's advisory lock on its session.
    with psycopg.connect(plain(db_url), autocommit=True, application_name="first-demo") as demo_:
        demo_.execute("SELECT pg_advisory_lock(%s)", (dbkit.advisory_key(DEMO_LOCK),))
        second = run_dbkit("demo", "--url", db_url, "--rows", "500")
        pid = demo_.info.backend_pid
    assert second.returncode == 1
    assert one_line(second.stderr) == (
        f"dbkit demo: another dbkit demo is running against {plain(db_url)} (pid {pid}); "
        "not starting"
    )
    assert counts(db_url) == before  # nothing written: staging not even truncated
    # The lock was all that stopped it.
    third = run_dbkit("demo", "--url", db_url, "--rows", "500")
    assert third.returncode == 0, third.stderr
    assert counts(db_url)["users_staging"] == 500
