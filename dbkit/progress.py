"""Progress of a long batch phase: a live bar in a terminal, a few plain lines in a log.

A bar redrawn in place is right for a person watching; in a log file or a CI job the same
redraws are noise, so off a terminal we print one line per tenth of the work (or per
``every`` rows when the total is unknown) and a last line with the rate.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import IO, Any, Self, TypeVar

__all__ = ["Progress"]

T = TypeVar("T")


class Progress:
    """Counts rows of one phase: ``update(n)`` as work is done, or ``wrap(iterable)``."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        out: IO[str] | None = None,
        bar: bool | None = None,
        every: int = 10_000,
    ) -> None:
        self.label = label
        self.total = total
        self.count = 0
        self._out = out if out is not None else sys.stdout
        self._started = time.perf_counter()
        self._every = every
        self._next_line = self._step()
        self._bar: Any = None
        if bar if bar is not None else _is_terminal(self._out):
            from tqdm import tqdm  # only when a terminal is there to draw on

            self._bar = tqdm(
                total=total, desc=label, unit=" rows", unit_scale=True, file=self._out, leave=True
            )

    def _step(self) -> int:
        return max(self.total // 10, 1) if self.total else self._every

    def update(self, n: int) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if self.count >= self._next_line and (self.total is None or self.count < self.total):
            done = f"{self.count}/{self.total} rows" if self.total else f"{self.count} rows"
            self._print(f"{self.label}: {done}")
            while self._next_line <= self.count:
                self._next_line += self._step()

    def wrap(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items`` unchanged, counting each one as it is taken."""
        for item in items:
            yield item
            self.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        seconds = time.perf_counter() - self._started
        self._print(f"{self.label}: {self.count} rows in {seconds:.2f}s")

    def _print(self, line: str) -> None:
        print(line, file=self._out, flush=True)  # flushed: a pipe reader sees it now

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._bar is not None:  # interrupted: leave the bar where it stopped
            self._bar.close()
            self._bar = None


def _is_terminal(out: IO[str]) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False
