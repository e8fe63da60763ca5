"""Static types of the public API, checked with mypy as a user's code would be."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api

TYPED = """
import sqlalchemy as sa
import dbkit

def f(db: dbkit.Database) -> None:
    stmt = sa.select(sa.literal(1, sa.Integer), sa.literal("x", sa.String))
    for number, text in db.execute(stmt):
        n: int = number
        s: str = text
    for row in db.execute("SELECT 1, 2, 3"):
        a, b, c = row
    count: int | None = db.scalar(sa.select(sa.literal(1, sa.Integer)))
    anything = db.scalar("SELECT 1")
"""


def check(tmp_path: Path, source: str) -> tuple[str, int]:
    module = tmp_path / "user_code.py"
    module.write_text(source)
    stdout, stderr, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(module)]
    )
    return stdout + stderr, status


@pytest.mark.slow
def test_execute_and_scalar_carry_the_statements_row_types(tmp_path: Path) -> None:
    output, status = check(tmp_path, TYPED)
    assert status == 0, output


@pytest.mark.slow
def test_a_wrong_row_type_is_caught(tmp_path: Path) -> None:
    output, status = check(tmp_path, TYPED.replace("s: str = text", "s: int = text"))
    assert status == 1
    assert 'Incompatible types in assignment (expression has type "str"' in output
