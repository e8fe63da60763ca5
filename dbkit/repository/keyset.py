"""Keyset pagination and ordering: ``Page``, what ``order_by`` accepts, and the
"rows after these values" condition that one index range scan answers."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.sql import operators

T = TypeVar("T")

# One ordering key: "name", "-name" (descending), or a column expression of the table.
OrderKey = str | sa.ColumnElement[Any]
OrderBy = OrderKey | Sequence[OrderKey] | None


@dataclass(frozen=True)
class Page(Generic[T]):
    """One keyset page: ``items``, and ``next_after`` to pass as ``after=`` for the next
    page (the sort-key values of the last item, primary key included); None at the end."""

    items: list[T]
    next_after: tuple[Any, ...] | None

    @property
    def has_next(self) -> bool:
        return self.next_after is not None


def descending(expr: sa.ColumnElement[Any]) -> tuple[sa.ColumnElement[Any], bool] | None:
    """(column, descending) for ``col``, ``col.asc()``, ``col.desc()``; else None."""
    if isinstance(expr, sa.UnaryExpression) and expr.modifier in (
        operators.asc_op,
        operators.desc_op,
    ):
        return expr.element, expr.modifier is operators.desc_op
    if isinstance(expr, sa.UnaryExpression):
        return None
    return expr, False


def keys_of(order_by: OrderBy) -> builtins.list[OrderKey]:
    if order_by is None:
        return []
    if isinstance(order_by, (str, sa.ColumnElement)):
        return [order_by]
    return builtins.list(order_by)


def after_clause(
    keys: Sequence[tuple[sa.Column[Any], bool]], values: Sequence[Any]
) -> sa.ColumnElement[bool]:
    """Rows strictly after ``values`` in the order of ``keys``.  All keys in one direction:
    the row-value comparison ``(k1, k2) > (v1, v2)``, which one index range scan answers;
    mixed directions: ``k1 > v1 OR (k1 = v1 AND k2 < v2) …``."""
    directions = {desc for _, desc in keys}
    if len(directions) == 1:
        (desc,) = directions
        if len(keys) == 1:
            col = keys[0][0]
            single: sa.ColumnElement[bool] = col < values[0] if desc else col > values[0]
            return single
        left = sa.tuple_(*(col for col, _ in keys))
        right = sa.tuple_(
            *(sa.literal(v, col.type) for (col, _), v in zip(keys, values, strict=True))
        )
        return left < right if desc else left > right
    alternatives = []
    for i, ((col, desc), value) in enumerate(zip(keys, values, strict=True)):
        equal = [k == v for (k, _), v in zip(keys[:i], values[:i], strict=True)]
        alternatives.append(sa.and_(*equal, col < value if desc else col > value))
    return sa.or_(*alternatives)
