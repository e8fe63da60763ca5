"""Contenders of the batch workloads (inserts, upserts): one op writes one whole batch, and
the warm-up writes a small one, so the heavy batch is not paid once more per contender."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .harness import Contender
from .schema import as_dicts

WARMUP_ROWS = 1000


@dataclass(frozen=True)
class Batch:
    """The same rows as tuples (email, name, score) and as dicts: each contender gets the
    shape its API takes, built before the clock starts."""

    tuples: list[tuple[str, str, int]]
    dicts: list[dict[str, Any]]

    @classmethod
    def of(cls, rows: Sequence[tuple[str, str, int]]) -> Batch:
        return cls(list(rows), as_dicts(rows))


def batch_contender(
    write: Callable[[Batch], Any], batch: Batch, warmup: Batch | None = None, note: str = ""
) -> Contender:
    small = warmup or Batch(batch.tuples[:WARMUP_ROWS], batch.dicts[:WARMUP_ROWS])

    def run(n: int) -> None:
        for _ in range(n):
            write(batch)

    return Contender(run, warmup=lambda: write(small), units_per_op=len(batch.tuples), note=note)
