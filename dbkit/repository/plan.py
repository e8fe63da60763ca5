"""What a repository class knows about its table, worked out once when the class is
defined: the columns to read and how rows become ``T``, the hook columns, the statements
that never change, and the values a mapping or model object writes."""

from __future__ import annotations

import builtins
import dataclasses
import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa

if TYPE_CHECKING:
    from dbkit.repository.base import Repository

_PK_PARAM = "_dbkit_pk_{}"


def _read_plan(model: type[Any] | None, table: sa.Table) -> tuple[list[sa.Column[Any]], bool]:
    """The columns to select for ``model`` and whether it can be built positionally.

    A dataclass (or any class whose leading parameters are columns) is built as
    ``model(*row)``, about three times cheaper than keywords; the rest as
    ``model(**mapping)``.  Only the columns the model accepts are selected, and a model
    parameter without a default that is not a column is a configuration error."""
    columns = list(table.columns)
    if model is None:
        return columns, False
    try:
        params = list(inspect.signature(model).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature: keywords, all columns
        return columns, False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return columns, False
    named = [p for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    missing = [p.name for p in named if p.default is p.empty and p.name not in table.c]
    if missing:
        raise TypeError(
            f"model {model.__qualname__} requires {', '.join(missing)}, which "
            f"{'is not a column' if len(missing) == 1 else 'are not columns'} of table "
            f"{table.name!r}"
        )
    accepted = [p for p in named if p.name in table.c]
    if not accepted:
        raise TypeError(f"model {model.__qualname__} takes no column of table {table.name!r}")
    positional_kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    lead = named[: len(accepted)]
    positional = lead == accepted and all(p.kind in positional_kinds for p in lead)
    return [table.c[p.name] for p in accepted], positional


def _row_makers(
    model: type[Any] | None, names: tuple[str, ...], positional: bool
) -> tuple[Callable[[Sequence[Any]], Any], Callable[[Iterable[Sequence[Any]]], Iterator[Any]]]:
    """(one row → T, rows → T's).  The second iterates in C (``starmap``, ``map``) with no
    Python frame per row but the model's own ``__init__``: it is what streams use."""
    if model is None:
        return (
            lambda row: dict(zip(names, row, strict=False)),
            lambda rows: map(dict, map(zip, itertools.repeat(names), rows)),
        )
    if positional:
        return (lambda row: model(*row), lambda rows: itertools.starmap(model, rows))

    def by_keyword(row: Sequence[Any]) -> Any:
        return model(**dict(zip(names, row, strict=False)))

    return by_keyword, lambda rows: map(by_keyword, rows)


class Plan:
    """What a repository class knows about its table, worked out once per class: the
    columns to read, the hooks' columns and values, the statements that never change."""

    def __init__(self, repo: type[Repository[Any]]) -> None:
        table = repo.table
        if not isinstance(table, sa.Table):
            raise TypeError(f"{repo.__qualname__}.table must be a sqlalchemy.Table")
        self.table = table
        self.name = table.fullname
        self.keys = frozenset(table.c.keys())
        self.pk: tuple[sa.Column[Any], ...] = tuple(table.primary_key.columns)
        if not self.pk:
            raise TypeError(f"{repo.__qualname__}: table {self.name!r} has no primary key")
        self.pk_keys = tuple(c.key for c in self.pk)

        def hook_column(option: str, name: str) -> sa.Column[Any]:
            if name not in table.c:
                raise TypeError(
                    f"{repo.__qualname__}.{option} = {name!r}, but table {self.name!r} has "
                    "no such column"
                )
            return table.c[name]

        self.created: sa.Column[Any] | None = None
        self.updated: sa.Column[Any] | None = None
        self.deleted: sa.Column[Any] | None = None
        self.version: sa.Column[Any] | None = None
        if repo.timestamps:
            self.created = hook_column("created_at_column", repo.created_at_column)
            self.updated = hook_column("updated_at_column", repo.updated_at_column)
        if repo.soft_delete_column is not None:
            self.deleted = hook_column("soft_delete_column", repo.soft_delete_column)
        if repo.version_column is not None:
            self.version = hook_column("version_column", repo.version_column)

        # Columns the repository sets itself on writes; values given for them are ignored.
        self.managed = frozenset(
            c.key for c in (self.created, self.updated, self.version) if c is not None
        )
        now = sa.func.now()
        self.insert_extras: dict[str, Any] = {}
        self.update_extras: dict[str, Any] = {}
        if self.created is not None and self.updated is not None:
            self.insert_extras = {self.created.key: now, self.updated.key: now}
            self.update_extras = {self.updated.key: now}
        if self.version is not None:
            self.insert_extras[self.version.key] = sa.literal(1, self.version.type)
            self.update_extras[self.version.key] = self.version + 1
        # A None from a model object for one of these means "let the database decide".
        self.defaulted = frozenset(
            c.key
            for c in table.columns
            if c.default is not None
            or c.server_default is not None
            or c.identity is not None
            or c is table.autoincrement_column
        )

        columns, positional = _read_plan(repo.model, table)
        self.columns = columns
        self.column_keys = tuple(c.key for c in columns)
        self.make, self.make_all = _row_makers(repo.model, self.column_keys, positional)
        self.is_model_type: Callable[[Any], bool] = (
            (lambda obj: isinstance(obj, cast(type, repo.model)))
            if repo.model is not None
            else (lambda obj: False)
        )
        self._fields: dict[type, tuple[str, ...]] = {}
        # upsert_many's unnest() statements by (columns, keys, update): building one costs
        # more than a small batch's round trip, and the inputs of a job rarely vary.
        self.unnest_upserts: dict[tuple[Any, ...], sa.Executable] = {}

        # Statements reused on every call (their cache keys are computed once).
        self.pk_params = tuple(
            sa.bindparam(_PK_PARAM.format(i), type_=c.type) for i, c in enumerate(self.pk)
        )
        # The one bind parameter of a single-column key, for the common get(42).
        self.scalar_pk = self.pk_params[0].key if len(self.pk) == 1 else None
        self.by_pk = sa.and_(*(c == p for c, p in zip(self.pk, self.pk_params, strict=True)))
        self.alive = self.deleted.is_(None) if self.deleted is not None else None
        alive = () if self.alive is None else (self.alive,)
        select = sa.select(*columns)
        self.get_visible = select.where(self.by_pk, *alive)
        self.get_any = select.where(self.by_pk)
        self.insert = sa.insert(table).values(**self.insert_extras)
        self.delete_by_pk = sa.delete(table).where(self.by_pk)
        if self.deleted is not None:
            marks = {self.deleted.key: now, **self.update_extras}
            self.soft_delete_by_pk = sa.update(table).where(self.by_pk, *alive).values(marks)

    # -- names -------------------------------------------------------------------------

    def column(self, name: object) -> sa.Column[Any]:
        if not isinstance(name, str) or name not in self.keys:
            raise ValueError(
                f"unknown column {name!r} for table {self.name!r} "
                f"(columns: {', '.join(self.table.c.keys())})"
            )
        return self.table.c[name]

    def check_names(self, names: Iterable[object]) -> None:
        unknown = [n for n in names if not isinstance(n, str) or n not in self.keys]
        if unknown:
            self.column(unknown[0])

    # -- values for writes -------------------------------------------------------------

    def values_of(self, row: Any) -> dict[str, Any]:
        """Column values to write from a mapping (checked: unknown keys are an error) or a
        model object (shallow; its attributes that are not columns are left out, and a None
        for a column with a database default is left to the database)."""
        if isinstance(row, Mapping):
            keys = row.keys()
            if not keys <= self.keys:
                self.check_names(keys)
            if self.managed and not self.managed.isdisjoint(keys):
                return {k: v for k, v in row.items() if k not in self.managed}
            return row if type(row) is dict else dict(row)
        skip = self.managed
        defaulted = self.defaulted
        return {
            k: v
            for k, v in self._items_of(row)
            if k not in skip and not (v is None and k in defaulted)
        }

    def _items_of(self, obj: Any) -> Iterable[tuple[str, Any]]:
        kind = type(obj)
        if isinstance(obj, (str, bytes)) or kind in (int, float, bool) or obj is None:
            raise TypeError(
                f"cannot write a {kind.__name__} to {self.name!r}: pass a mapping of column "
                "values or a model object"
            )
        names = self._fields.get(kind)
        if names is None:
            if dataclasses.is_dataclass(obj):
                names = tuple(f.name for f in dataclasses.fields(obj) if f.name in self.keys)
            else:
                names = ()
            self._fields[kind] = names
        if names:
            return ((n, getattr(obj, n)) for n in names)
        if hasattr(obj, "_asdict"):  # named tuples
            items: Iterable[tuple[str, Any]] = obj._asdict().items()
        elif hasattr(obj, "__dict__"):
            items = vars(obj).items()
        else:  # __slots__ classes
            items = ((n, getattr(obj, n)) for n in self.keys if hasattr(obj, n))
        return ((k, v) for k, v in items if k in self.keys)

    def grouped(self, rows: Iterable[Any]) -> list[builtins.list[dict[str, Any]]]:
        """Rows as value dicts, in input order, cut into runs with the same columns (one
        executemany each).  Every row is checked before anything is sent."""
        groups: list[builtins.list[dict[str, Any]]] = []
        current: builtins.list[dict[str, Any]] = []
        current_keys: Any = None
        for row in rows:
            values = self.values_of(row)
            keys = values.keys()
            if keys != current_keys:
                current = []
                groups.append(current)
                current_keys = keys
            current.append(values)
        return groups
