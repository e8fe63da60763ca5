"""Repository bulk paths at scale: add_many order, insert_many, bulk_load (COPY),
upsert_many (de-duplication, 50k rows, two concurrent writers) and streaming with its
peak memory measured in a child process."""

from __future__ import annotations

import gc
import json
import random
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from dbkit import Database
from dbkit.errors import DuplicateKeyError
from dbkit.repository import Repository, bulk

metadata = sa.MetaData()
people = sa.Table(
    "people",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("email", sa.Text, nullable=False, unique=True),
    sa.Column("name", sa.Text),
    sa.Column("score", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tags", postgresql.ARRAY(sa.Text)),
    sa.Column("data", postgresql.JSONB),
)
scores = sa.Table(
    "scores",
    metadata,
    sa.Column("player", sa.Text, primary_key=True),
    sa.Column("game", sa.Integer, primary_key=True),
    sa.Column("points", sa.Integer, nullable=False),
    sa.Column("writer", sa.Text),
)

# A unique key that may be NULL: PostgreSQL lets any number of rows have it NULL.
codes = sa.Table(
    "codes",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("code", sa.Text, unique=True),
    sa.Column("note", sa.Text),
)


@dataclass
class Person:
    email: str
    name: str | None = None
    score: int | None = None
    id: int | None = None
    tags: list[str] | None = None
    data: dict[str, Any] | None = None


class People(Repository[Person]):
    table = people
    model = Person


class Scores(Repository[dict[str, Any]]):
    table = scores


@pytest.fixture
def schema(db: Database) -> Database:
    metadata.create_all(db.engine)
    return db


@pytest.fixture
def repo(schema: Database) -> People:
    return People(schema)


@pytest.fixture
def score_repo(schema: Database) -> Scores:
    return Scores(schema)


@pytest.fixture(params=["unnest", "copy"])
def upsert_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """upsert_many's two ways: unnest() arrays (small inputs) or COPY + merge (large)."""
    if request.param == "copy":
        monkeypatch.setattr(bulk, "COPY_UPSERT_ROWS", 0)
    else:
        monkeypatch.setattr(bulk, "COPY_UPSERT_ROWS", 10**9)
    return str(request.param)


def statements(db: Database) -> int:
    return db.query_stats().statements


# ------------------------------------------------------------------------------ add_many


def test_add_many_returns_5000_rows_in_input_order(schema: Database, repo: People) -> None:
    emails = [f"user{i}@example.com" for i in range(5000)]
    random.Random(4).shuffle(emails)
    stored = repo.add_many({"email": e, "score": i} for i, e in enumerate(emails))
    assert [p.email for p in stored] == emails
    assert [p.score for p in stored] == list(range(5000))
    assert len({p.id for p in stored}) == 5000
    sample = random.Random(5).sample(stored, 20)
    assert [repo.get(p.id) for p in sample] == sample


def test_add_many_with_different_columns_keeps_input_order(repo: People) -> None:
    rows: list[Any] = [
        {"email": "a@x.org"},
        {"email": "b@x.org", "name": "B"},
        Person(email="c@x.org", score=3),
        {"email": "d@x.org", "name": "D"},
        {"email": "e@x.org"},
    ]
    assert [p.email for p in repo.add_many(rows)] == [
        "a@x.org",
        "b@x.org",
        "c@x.org",
        "d@x.org",
        "e@x.org",
    ]
    assert repo.get_one_or_none(email="c@x.org").score == 3  # type: ignore[union-attr]


def test_empty_inputs_send_nothing(schema: Database, repo: People) -> None:
    before = statements(schema)
    assert repo.add_many([]) == []
    assert repo.insert_many([]) == 0
    assert repo.bulk_load(iter([])) == 0
    assert repo.upsert_many([], conflict=["email"]) == 0
    assert statements(schema) == before


def test_a_failing_row_leaves_nothing_of_the_batch(repo: People) -> None:
    repo.add({"email": "taken@x.org"})
    rows = [{"email": f"{i}@x.org"} for i in range(3000)] + [{"email": "taken@x.org"}]
    with pytest.raises(DuplicateKeyError):
        repo.add_many(rows)
    with pytest.raises(DuplicateKeyError):
        repo.insert_many(rows)
    assert repo.count() == 1


# --------------------------------------------------------------------------- insert_many


def test_insert_many_counts_and_stores(repo: People) -> None:
    rows: list[Any] = [{"email": f"{i}@x.org", "data": {"n": i}} for i in range(2500)]
    rows.append(Person(email="model@x.org", tags=["a", "b"]))
    assert repo.insert_many(rows) == 2501
    assert repo.count() == 2501
    assert repo.get_one_or_none(email="7@x.org").data == {"n": 7}  # type: ignore[union-attr]
    assert repo.get_one_or_none(email="model@x.org").tags == ["a", "b"]  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- bulk_load


def test_bulk_load_from_mappings_tuples_and_models(repo: People) -> None:
    assert repo.bulk_load([{"email": "m1@x.org", "name": "M", "data": {"k": [1, 2]}}]) == 1
    assert (
        repo.bulk_load(
            [("t1@x.org", "T", 5), ("t2@x.org", None, 6)], columns=["email", "name", "score"]
        )
        == 2
    )
    assert repo.bulk_load([(100, "all@x.org", "All", 1, ["x"], None)]) == 1  # every column
    assert repo.bulk_load([Person(email="p1@x.org", tags=["a"]), Person(email="p2@x.org")]) == 2
    by_email = {p.email: p for p in repo.list()}
    assert by_email["m1@x.org"].data == {"k": [1, 2]}
    assert (by_email["t1@x.org"].score, by_email["t2@x.org"].name) == (5, None)
    assert by_email["all@x.org"].id == 100 and by_email["all@x.org"].tags == ["x"]
    assert by_email["p1@x.org"].tags == ["a"] and by_email["p2@x.org"].score == 0
    assert by_email["p1@x.org"].id is not None  # None id from the model: left to the identity


def test_bulk_load_streams_a_generator(repo: People) -> None:
    consumed = 0

    def rows() -> Iterator[tuple[str, int]]:
        nonlocal consumed
        for i in range(30_000):
            consumed += 1
            yield (f"gen{i}@x.org", i)

    assert repo.bulk_load(rows(), columns=["email", "score"]) == 30_000
    assert consumed == 30_000
    assert repo.count() == 30_000
    assert repo.count(repo.c.score >= 29_990) == 10


def test_bulk_load_is_all_or_nothing(schema: Database, repo: People) -> None:
    repo.add({"email": "taken@x.org"})

    def failing() -> Iterator[dict[str, Any]]:
        for i in range(5000):
            if i == 4000:
                raise RuntimeError("source broke")
            yield {"email": f"{i}@x.org"}

    with pytest.raises(RuntimeError, match="source broke"):
        repo.bulk_load(failing())
    assert repo.count() == 1

    rows = [{"email": f"{i}@x.org"} for i in range(5000)] + [{"email": "taken@x.org"}]
    with pytest.raises(DuplicateKeyError, match=r"taken@x\.org") as caught:
        repo.bulk_load(rows)
    assert caught.value.constraint == "people_email_key"
    assert repo.count() == 1
    assert schema.stats().in_use == 0


def test_bulk_load_is_observed_as_one_copy_statement(schema: Database, repo: People) -> None:
    texts: list[tuple[str | None, str]] = []
    schema.add_statement_listener(
        lambda seconds, error, text: texts.append((error and type(error).__name__, text()))
    )
    before = schema.query_stats()
    assert repo.bulk_load([("a@x.org", 1), ("b@x.org", 2)], columns=["email", "score"]) == 2
    with pytest.raises(DuplicateKeyError):
        repo.bulk_load([("a@x.org", 3)], columns=["email", "score"])
    after = schema.query_stats()
    assert after.statements - before.statements == 2
    assert after.errors_by_class.get("23", 0) - before.errors_by_class.get("23", 0) == 1
    copies = [(error, text) for error, text in texts if text.startswith("COPY")]
    assert copies == [
        (None, 'COPY "people" ("email", "score") FROM STDIN'),
        ("UniqueViolation", 'COPY "people" ("email", "score") FROM STDIN'),
    ]


@pytest.mark.parametrize(
    ("rows", "columns", "message"),
    [
        ([("a@x.org", 1), ("b@x.org",)], ["email", "score"], "1 values for 2 columns"),
        ([("a@x.org",)], None, "1 values for 6 columns"),
        ([{"email": "a@x.org"}, {"name": "no email"}], None, "no value for column"),
        ([{"email": "a@x.org"}, {"email": "b@x.org", "nope": 1}], None, "unknown column 'nope'"),
        ([{"email": "a@x.org"}, {"email": "b@x.org", "name": "N"}], None, "first row"),
        ([{"email": "a@x.org"}, ("b@x.org",)], None, "must all be mappings"),
        ([("a@x.org",)], ["email", "email"], "twice"),
    ],
)
def test_bulk_load_refuses_malformed_rows(
    repo: People, rows: list[Any], columns: list[str] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        repo.bulk_load(rows, columns=columns)
    assert repo.count() == 0


# --------------------------------------------------------------------------- upsert_many


def test_upsert_many_last_duplicate_wins(repo: People, upsert_path: str) -> None:
    repo.add({"email": "a@x.org", "name": "old", "score": 1})
    written = repo.upsert_many(
        [
            {"email": "a@x.org", "name": "first"},
            {"email": "b@x.org", "name": "b1"},
            {"email": "a@x.org", "name": "second"},
            {"email": "b@x.org", "name": "b2"},
            {"email": "a@x.org", "name": "last"},
        ],
        conflict=["email"],
    )
    assert written == 2
    assert {p.email: (p.name, p.score) for p in repo.list()} == {
        "a@x.org": ("last", 1),  # score was not given: kept
        "b@x.org": ("b2", 0),
    }


def test_upsert_many_never_merges_rows_whose_key_is_null(
    schema: Database, upsert_path: str
) -> None:
    class Codes(Repository[dict[str, Any]]):
        table = codes

    repo = Codes(schema)
    rows = [
        {"code": None, "note": "a"},
        {"code": "x", "note": "b"},
        {"code": None, "note": "c"},
        {"code": "x", "note": "d"},
    ]
    assert repo.upsert_many(rows, conflict=["code"]) == 3
    assert sorted((r["code"] or "", r["note"]) for r in repo.list()) == [
        ("", "a"),
        ("", "c"),
        ("x", "d"),
    ]


def test_upsert_many_50k_rows_half_conflicting(repo: People) -> None:
    n = 50_000
    repo.bulk_load(
        ((f"u{i}@x.org", "old", i) for i in range(0, n, 2)), columns=["email", "name", "score"]
    )
    ids = {p.email: p.id for p in repo.stream()}
    rows = [{"email": f"u{i}@x.org", "name": "new", "score": -i} for i in range(n)]
    random.Random(1).shuffle(rows)
    rows += rows[:100]  # duplicates of the same values
    assert repo.upsert_many(rows, conflict=["email"], chunk_size=7_000) == n
    assert repo.count() == n
    assert repo.count(name="new") == n
    assert repo.count(repo.c.score <= 0) == n
    survivors = {p.email: p.id for p in repo.list(repo.c.email.in_(list(ids)[:500]))}
    assert all(ids[e] == i for e, i in survivors.items())  # updated in place, not re-inserted


def test_upsert_many_composite_key_update_columns_and_array_columns(
    repo: People, score_repo: Scores, upsert_path: str
) -> None:
    score_repo.upsert_many(
        [{"player": "ann", "game": g, "points": g, "writer": "one"} for g in range(3)]
    )  # conflict defaults to the primary key
    score_repo.upsert_many(
        [{"player": "ann", "game": 1, "points": 100, "writer": "two"}],
        update=["points"],
    )
    assert score_repo.get(("ann", 1)) == {
        "player": "ann",
        "game": 1,
        "points": 100,
        "writer": "one",
    }

    # A column that is itself an array cannot go through unnest(): always COPY.
    repo.upsert_many(
        [{"email": "t@x.org", "tags": ["a", "b"], "data": {"v": 1}}], conflict=["email"]
    )
    repo.upsert_many(
        [{"email": "t@x.org", "tags": ["c"], "data": {"v": 2}}] * 2, conflict=["email"]
    )
    stored = repo.get_one_or_none(email="t@x.org")
    assert stored is not None and stored.tags == ["c"] and stored.data == {"v": 2}

    with pytest.raises(ValueError, match="conflict key"):
        repo.upsert_many([{"email": "x@x.org"}, {"name": "no key"}], conflict=["email"])
    with pytest.raises(ValueError, match="chunk_size"):
        repo.upsert_many([{"email": "x@x.org"}], conflict=["email"], chunk_size=0)


def test_concurrent_upserts_on_the_same_keys_serialize_cleanly(
    schema: Database, upsert_path: str
) -> None:
    """Two writers upsert the same 3,000 keys (in opposite input orders; unnest: several
    chunks each) at once: no deadlock, no error, no duplicate; each round ends with one
    writer's rows.

    That they really overlap is proven on the server: both run in transactions that are
    open at the same time, and the writer whose upsert_many returns first keeps its
    transaction (and so every row lock) open until PostgreSQL shows the other writer
    waiting for it; only then does it commit."""
    repo = Scores(schema)
    keys = [(f"p{i % 300}", i // 300) for i in range(3000)]
    for round_ in range(3):
        errors, waits = _overlapping_upserts(schema, repo, keys, round_)
        assert errors == []
        assert len(waits) == 1, "the writers did not overlap: neither waited for the other"
        rows = repo.list()
        assert len(rows) == 3000
        assert {r["points"] for r in rows} == {round_}
        # The writer that waited wrote last: its rows are the ones left.
        assert {r["writer"] for r in rows} == {waits[0][0]}, "rows of both writers survived"


def _overlapping_upserts(
    schema: Database, repo: Scores, keys: list[tuple[str, int]], points: int
) -> tuple[list[BaseException], list[tuple[str, str]]]:
    """Writers A (keys in order) and B (reversed) upsert at once, each in a transaction
    block; the first to be done holds its block open until B/A waits for it.  Returns the
    errors and the waits seen: (writer that waited, writer it waited for)."""
    pids: dict[str, int] = {}
    finished: list[str] = []
    waits: list[tuple[str, str]] = []
    lock = threading.Lock()
    inside = threading.Barrier(2)

    def write(name: str, order: list[tuple[str, int]]) -> None:
        other = "B" if name == "A" else "A"
        with schema.transaction() as conn:
            pids[name] = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            inside.wait(timeout=60)  # both transactions are open now
            repo.upsert_many(
                [{"player": p, "game": g, "points": points, "writer": name} for p, g in order],
                chunk_size=700,
            )
            with lock:
                finished.append(name)
                first = len(finished) == 1
            if first and _blocked_by(conn, pids[other], pids[name], finished):
                waits.append((other, name))

    errors = _race(write, [("A", keys), ("B", keys[::-1])])
    return errors, waits


def _blocked_by(
    conn: sa.Connection, waiting: int, holder: int, finished: list[str], patience: float = 60
) -> bool:
    """Poll (on the holder's own connection: pg_blocking_pids reads the live lock table)
    until backend ``waiting`` waits for a lock ``holder`` holds.  False if that never
    happens: the other writer finished meanwhile, or ``patience`` seconds passed."""
    query = sa.text("SELECT CAST(:holder AS int) = ANY(pg_blocking_pids(:waiting))")
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline and len(finished) < 2:
        if conn.execute(query, {"holder": holder, "waiting": waiting}).scalar_one():
            return True
        time.sleep(0.005)
    return False


def _race(work: Callable[..., Any], arguments: list[tuple[Any, ...]]) -> list[BaseException]:
    """Run work(*args) for each args in its own thread, all released at once; the errors
    they raised (a thread that never ends is one too)."""
    barrier = threading.Barrier(len(arguments))
    errors: list[BaseException] = []

    def run(*args: Any) -> None:
        try:
            barrier.wait(timeout=60)
            work(*args)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=args) for args in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    errors.extend(TimeoutError(f"{t.name} never finished") for t in threads if t.is_alive())
    return errors


# -------------------------------------------------------------------------------- memory


def _peak(work: Callable[[], Any]) -> tuple[int, Any]:
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = work()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, result


# A bound that the stream must stay under and that a client-side cursor over the same rows
# must exceed, both by a wide margin: ~60 MiB of rows against 1,000 rows (~1 MiB) a fetch.
STREAM_ROWS = 60_000
ROW_BYTES = 1024
STREAM_BOUND_MIB = 16


def _probe_rss(db_url: str, mode: str) -> dict[str, int]:
    """Peak-RSS growth of a fresh child process reading the payloads table (see
    stream_rss_probe.py): tracemalloc would not see libpq's buffers."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("stream_rss_probe.py")), db_url, mode],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable VmHWM"
)
def test_streaming_stays_in_bounded_memory_where_a_client_cursor_does_not(
    schema: Database, db_url: str
) -> None:
    schema.execute(
        "CREATE TABLE payloads (id int PRIMARY KEY, body text NOT NULL);"
        # ~1 KiB of text a row, made on the server (nothing to send).
        f"INSERT INTO payloads SELECT g, repeat(md5(g::text), {ROW_BYTES // 32}) "
        f"FROM generate_series(1, {STREAM_ROWS}) AS g"
    )
    assert schema.scalar("SELECT count(*) FROM payloads") == STREAM_ROWS
    streamed = _probe_rss(db_url, "stream")
    client = _probe_rss(db_url, "client")
    print(
        f"\n{STREAM_ROWS:,} rows of {ROW_BYTES} bytes: peak RSS growth "
        f"stream(batch_size=1000) {streamed['peak_growth_kib'] / 1024:.1f} MiB, "
        f"client-side cursor {client['peak_growth_kib'] / 1024:.1f} MiB"
    )
    assert streamed["rows"] == client["rows"] == STREAM_ROWS
    assert streamed["in_use_after"] == client["in_use_after"] == 0
    assert streamed["peak_growth_kib"] < STREAM_BOUND_MIB * 1024
    # The companion: the same rows through a client-side cursor break the bound, twice over;
    # were they not to, the bound above would prove nothing.
    assert client["peak_growth_kib"] > 2 * STREAM_BOUND_MIB * 1024


def test_bulk_load_of_a_generator_is_not_materialized(repo: People) -> None:
    n = 100_000

    def rows() -> Iterator[tuple[str, str, int]]:
        return ((f"g{i}@x.org", f"name {i}", i) for i in range(n))

    list_peak, _ = _peak(lambda: list(rows()))
    load_peak, loaded = _peak(lambda: repo.bulk_load(rows(), columns=["email", "name", "score"]))
    print(
        f"\n100k rows: list peak {list_peak / 2**20:.1f} MiB, "
        f"bulk_load peak {load_peak / 2**20:.1f} MiB"
    )
    assert loaded == n
    assert load_peak < list_peak / 5
