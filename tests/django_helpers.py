"""Helpers shared by the transaction tests ported from Django (table: ``reporters``)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from dbkit import Database

Names = set[tuple[str, str]]


def create(db: Database, first: str = "", last: str = "") -> int:
    """INSERT through ``db.execute``: joins this thread's ambient transaction, if any."""
    new_id: int = db.execute(
        "INSERT INTO reporters (first_name, last_name) VALUES (:f, :l) RETURNING id",
        {"f": first, "l": last},
    ).scalar_one()
    return new_id


def names(db: Database) -> Names:
    """The rows as this thread sees them: after a block, on an autocommit connection; inside
    an open block, on that block's connection."""
    rows = db.execute("SELECT first_name, last_name FROM reporters")
    return {(r.first_name, r.last_name) for r in rows}


def run_threads(*targets: Callable[[], None], barriers: tuple[threading.Barrier, ...] = ()) -> None:
    """Run each target in its own thread; re-raise the first error.  A failing target breaks
    the barriers so that the others fail fast instead of waiting for it."""
    errors: list[BaseException] = []

    def wrap(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                errors.append(exc)
                for barrier in barriers:
                    barrier.abort()

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "worker thread did not finish"
    if errors:
        raise errors[0]
