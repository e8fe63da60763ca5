"""The ``Repository`` class: the public methods, each building its statement and running
it on the right connection; the machinery lives in the sibling modules."""

from __future__ import annotations

import builtins
import contextlib
import functools
import itertools
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Row
from sqlalchemy.sql.base import ReadOnlyColumnCollection

from dbkit.connection import rollback_quietly
from dbkit.errors import (
    ConflictError,
    MultipleResultsError,
    NotFoundError,
    TransactionBroken,
    translate,
)
from dbkit.fastpath.driver import FastGet
from dbkit.fastpath.sqlalchemy import Declined, instrumented
from dbkit.repository import bulk, merge
from dbkit.repository.bulk import (
    DEFAULT_UPSERT_CHUNK,
    END,
    CopyPlan,
    CopyUpsert,
    UpsertStatement,
    UpsertStep,
    require_keys,
    sort_by_key,
    tuple_getter,
)
from dbkit.repository.keyset import OrderBy, Page, after_clause, descending, keys_of
from dbkit.repository.merge import DEFAULT_MERGE_CHUNK, MergeChunk, MergeResult, OnConflict
from dbkit.repository.plan import Plan
from dbkit.repository.streaming import driver_stream
from dbkit.retrying import is_read

if TYPE_CHECKING:
    from dbkit.database import Database
    from dbkit.transaction import DbkitConnection

T = TypeVar("T")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

# A filter: a SQLAlchemy boolean expression (repo.c.age > 18), or explicit sa.text(...).
Filter = sa.ColumnElement[bool] | sa.TextClause

_SCALAR_KEYS = frozenset({int, str, uuid.UUID})


def _translating(method: F) -> F:
    """Integrity violations leave a repository method as dbkit errors (or the subclass's
    ``constraint_errors``), chained from the driver's."""

    @functools.wraps(method)
    def wrapper(self: Repository[Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (sa_exc.DBAPIError, psycopg.Error) as exc:
            error = translate(exc, self.constraint_errors)
            if error is exc:
                raise
            raise error from exc

    return cast(F, wrapper)


def _non_negative(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


class Repository(Generic[T]):
    """Base class for one table's repository::

        class UserRepository(dbkit.Repository[User]):
            table = users            # sqlalchemy.Table
            model = User             # optional: a dataclass or any keyword-built class
            timestamps = True        # optional hooks, see below

        repo = UserRepository(db)

    Hooks (all off by default):

    - ``timestamps``: ``created_at_column``/``updated_at_column`` are set to ``now()`` (the
      transaction's time) by every write path; ``created_at`` is never changed by an
      update or an upsert that hits an existing row.
    - ``soft_delete_column`` (e.g. ``"deleted_at"``): ``delete``/``delete_where`` set it;
      reads, counts, ``update``, ``stream`` and ``page`` skip such rows unless
      ``include_deleted=True``; ``restore(pk)`` and ``hard_delete(pk)``; an upsert that
      hits a deleted row brings it back.
    - ``version_column``: optimistic locking; writes set it to 1 and add 1 on every
      update; ``update(pk, ..., expected_version=n)`` raises ``ConflictError`` when the
      row is at another version (``NotFoundError`` when it is gone).

    The repository owns the hook columns: values given for them in mappings, model objects
    or ``update()`` keywords are ignored.

    Keyword filters (``**eq``) share the namespace of the methods' own keywords
    (``order_by``, ``limit``, ``offset``, ``include_deleted``, ``batch_size``, ``after``):
    filter on such a column with an expression, ``repo.c.limit == 5``.
    """

    table: ClassVar[sa.Table]
    model: ClassVar[type[Any] | None] = None
    timestamps: ClassVar[bool] = False
    created_at_column: ClassVar[str] = "created_at"
    updated_at_column: ClassVar[str] = "updated_at"
    soft_delete_column: ClassVar[str | None] = None
    version_column: ClassVar[str | None] = None
    # Constraint name → exception class raised instead of dbkit's (e.g. EmailTaken).
    constraint_errors: ClassVar[Mapping[str, type[Exception]]] = {}

    # What the class declares, worked out once: columns, statements, how rows become T.
    table_plan: ClassVar[Plan]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "table", None) is not None:
            cls.table_plan = Plan(cls)

    def __init__(self, db: Database) -> None:
        if getattr(type(self), "table_plan", None) is None:
            raise TypeError(f"{type(self).__qualname__} needs a `table = <sqlalchemy.Table>`")
        self._db = db
        # Per (include_deleted, driver path): the primary's and each replica's.
        self._fast_gets: dict[tuple[bool, int], FastGet] = {}

    @property
    def db(self) -> Database:
        return self._db

    @property
    def c(self) -> ReadOnlyColumnCollection[str, sa.Column[Any]]:
        """The table's columns, for where-expressions: ``repo.c.age >= 18``."""
        return self.table.c

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} table={self.table_plan.name!r}>"

    # -- reading ---------------------------------------------------------------------------

    @_translating
    def get(self, pk: Any, *, include_deleted: bool = False) -> T:
        """The row with primary key ``pk`` (a scalar, or a tuple/mapping for a composite
        key); ``NotFoundError`` when there is none."""
        plan = self.table_plan
        params = self._pk_params(pk)
        stmt = plan.get_any if include_deleted else plan.get_visible
        if self._db.connection() is not None:
            row = self._fetch_one(stmt, params)
        else:
            row = self._db.run_read(lambda db: self._get_alone(db, stmt, params, include_deleted))
        if row is None:
            raise self._not_found(pk)
        return cast(T, plan.make(row))

    def _get_alone(
        self, db: Database, stmt: sa.Select[Any], params: dict[str, Any], include_deleted: bool
    ) -> Any:
        """``get`` outside a block on ``db`` (the primary or a replica): straight on the
        driver connection when it can.  On the primary a dead pooled connection is retried;
        on a replica the failure goes back to ``run_read``, which turns to the primary."""
        retry = db is self._db
        fast = self._fast_get(db, include_deleted)
        try:
            if fast is None:
                raise Declined
            return db.run_alone(lambda: fast.fetch(params), retry=retry)
        except Declined:
            return db.run_autocommit(lambda conn: conn.execute(stmt, params).first(), retry=retry)

    @_translating
    def get_one_or_none(self, *where: Filter, include_deleted: bool = False, **eq: Any) -> T | None:
        """The one row matching the filters, None when none does; ``MultipleResultsError``
        when several do."""
        stmt = self._select(where, eq, include_deleted).limit(2)
        rows = self._fetch(stmt)
        if len(rows) > 1:
            raise MultipleResultsError(f"more than one row of {self.table_plan.name!r} matches")
        return cast(T, self.table_plan.make(rows[0])) if rows else None

    @_translating
    def list(
        self,
        *where: Filter,
        order_by: OrderBy = None,
        limit: int | None = None,
        offset: int | None = None,
        include_deleted: bool = False,
        **eq: Any,
    ) -> builtins.list[T]:
        """Rows matching every filter (``*where`` expressions and ``column=value``),
        in ``order_by`` order (unordered without it)."""
        stmt = self._select(where, eq, include_deleted).order_by(*self._order_clauses(order_by))
        if limit is not None:
            stmt = stmt.limit(_non_negative("limit", limit))
        if offset is not None:
            stmt = stmt.offset(_non_negative("offset", offset))
        return builtins.list(self.table_plan.make_all(self._fetch(stmt)))

    @_translating
    def count(self, *where: Filter, include_deleted: bool = False, **eq: Any) -> int:
        conditions = self._conditions(where, eq, include_deleted)
        stmt = sa.select(sa.func.count()).select_from(self.table).where(*conditions)
        return int(self._scalar(stmt))

    @_translating
    def exists(self, *where: Filter, include_deleted: bool = False, **eq: Any) -> bool:
        """``SELECT EXISTS (…)``: stops at the first matching row."""
        conditions = self._conditions(where, eq, include_deleted)
        inner = sa.select(sa.literal(1)).select_from(self.table).where(*conditions)
        return bool(self._scalar(sa.select(inner.exists())))

    def stream(
        self,
        *where: Filter,
        batch_size: int = 1000,
        order_by: OrderBy = None,
        include_deleted: bool = False,
        **eq: Any,
    ) -> Generator[T, None, None]:
        """Matching rows one by one from a server-side cursor, ``batch_size`` at a time:
        memory stays bounded however many rows there are.

        Inside a transaction block the cursor lives in that transaction.  Outside one, the
        stream checks out a connection of its own and holds a transaction open on it until
        the iterator is exhausted or closed (``with contextlib.closing(repo.stream())``,
        or just iterate to the end); it never becomes this thread's ambient transaction,
        so writes made while iterating are not part of it."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        stmt = self._select(where, eq, include_deleted).order_by(*self._order_clauses(order_by))
        return self._stream(stmt, batch_size)

    @_translating
    def page(
        self,
        *where: Filter,
        order_by: OrderBy = None,
        after: Sequence[Any] | None = None,
        limit: int = 100,
        include_deleted: bool = False,
        **eq: Any,
    ) -> Page[T]:
        """One keyset page of at most ``limit`` rows, ordered by ``order_by`` (default: the
        primary key) with the primary key appended as tie-breaker.  ``after`` is the
        previous page's ``next_after``.  Sort keys must be NOT NULL columns of the table
        (a NULL cannot be compared, and a page after it would silently be empty)."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        keys = self._keyset(order_by)
        conditions = self._conditions(where, eq, include_deleted)
        if after is not None:
            after = tuple(after)
            if len(after) != len(keys):
                raise ValueError(
                    f"after= needs {len(keys)} values ({', '.join(c.key for c, _ in keys)}), "
                    f"got {len(after)}: pass the previous page's next_after"
                )
            conditions.append(after_clause(keys, after))
        plan = self.table_plan
        extra = [col for col, _ in keys if col.key not in plan.column_keys]
        selected = [*plan.columns, *extra]
        position = {col.key: i for i, col in enumerate(selected)}
        stmt = (
            sa.select(*selected)
            .where(*conditions)
            .order_by(*(col.desc() if desc else col.asc() for col, desc in keys))
            .limit(limit + 1)
        )
        rows = self._fetch(stmt)
        more = len(rows) > limit
        rows = rows[:limit]
        width = len(plan.columns)
        items = [plan.make(row[:width] if extra else row) for row in rows]
        next_after = None
        if more:
            last = rows[-1]
            next_after = tuple(last[position[col.key]] for col, _ in keys)
        return Page(items, next_after)

    def like(
        self,
        column: str,
        text: str,
        mode: Literal["contains", "startswith", "endswith"] = "contains",
        *,
        case_sensitive: bool = True,
    ) -> sa.ColumnElement[bool]:
        """A LIKE/ILIKE condition that matches ``text`` literally: ``%`` and ``_`` in it are
        escaped, so user input cannot widen the pattern."""
        col = self.table_plan.column(column)
        ops: dict[tuple[bool, str], Callable[..., sa.ColumnElement[bool]]] = {
            (True, "contains"): col.contains,
            (True, "startswith"): col.startswith,
            (True, "endswith"): col.endswith,
            (False, "contains"): col.icontains,
            (False, "startswith"): col.istartswith,
            (False, "endswith"): col.iendswith,
        }
        op = ops.get((case_sensitive, mode))
        if op is None:
            raise ValueError(f"mode must be contains, startswith or endswith, not {mode!r}")
        return op(text, autoescape=True)

    # -- writing ---------------------------------------------------------------------------

    @_translating
    def add(self, obj: Any) -> T:
        """Insert one row (a mapping or a model object); returns it as stored
        (``INSERT … RETURNING``: defaults and generated keys included)."""
        values = self.table_plan.values_of(obj)
        row = self._fetch_one(self.table_plan.insert.returning(*self.table_plan.columns), values)
        assert row is not None
        return cast(T, self.table_plan.make(row))

    @_translating
    def add_many(self, rows: Iterable[Any]) -> builtins.list[T]:
        """Insert rows and return them as stored, in input order (insertmanyvalues: one
        round trip per 1,000 rows, ``RETURNING`` sorted by parameter order)."""
        groups = self.table_plan.grouped(rows)
        if not groups:
            return []
        plan = self.table_plan
        stmt = plan.insert.returning(*plan.columns, sort_by_parameter_order=True)
        stored: builtins.list[T] = []
        with self._writing(single=len(groups) == 1 and len(groups[0]) == 1) as conn:
            for group in groups:
                stored.extend(plan.make_all(conn.execute(stmt, group)))
        return stored

    @_translating
    def insert_many(self, rows: Iterable[Any]) -> int:
        """Insert rows without reading anything back (executemany, pipelined by psycopg);
        returns how many were inserted."""
        groups = self.table_plan.grouped(rows)
        if not groups:
            return 0
        with self._writing(single=len(groups) == 1 and len(groups[0]) == 1) as conn:
            for group in groups:
                conn.execute(self.table_plan.insert, group)
        return sum(len(group) for group in groups)

    @_translating
    def bulk_load(self, rows: Iterable[Any], columns: Sequence[str] | None = None) -> int:
        """Load rows with ``COPY … FROM STDIN``, the fastest way into PostgreSQL; returns the
        number of rows loaded.  Rows may be mappings, model objects, or tuples in the order
        of ``columns`` (default: every column of the table).  The columns are taken from
        ``columns`` or the first row.  An iterator is streamed, never held in memory.

        All or nothing: the COPY runs in the ambient transaction or in its own."""
        iterator = iter(rows)
        first = next(iterator, END)
        if first is END:
            return 0
        copy = CopyPlan(self.table_plan, first, columns)
        with self._db.transaction(savepoint=False) as conn:
            if self._db.get_rollback():  # COPY bypasses the connection's own guard
                raise TransactionBroken(
                    "cannot bulk_load: this transaction is marked for rollback (an earlier "
                    "statement failed, or set_rollback(True)); no statement can run until "
                    "the block ends"
                )
            return copy.run(conn, itertools.chain((first,), iterator))

    @_translating
    def upsert(
        self,
        row: Any,
        conflict: Sequence[str] | None = None,
        *,
        update: Sequence[str] | None = None,
    ) -> T:
        """Insert the row, or update the existing row with the same ``conflict`` key
        (default: the primary key) — one atomic ``INSERT … ON CONFLICT DO UPDATE …
        RETURNING``.  ``update`` limits the columns overwritten on conflict (default: every
        given column outside the key)."""
        plan = self.table_plan
        keys = self._conflict_keys(conflict)
        values = plan.values_of(row)
        require_keys(values, keys, plan.name)
        insert = pg.insert(self.table).values(**plan.insert_extras)
        stmt = insert.on_conflict_do_update(
            index_elements=[self.table.c[k] for k in keys],
            set_=self._conflict_set(insert, values.keys(), keys, update),
        ).returning(*plan.columns)
        stored = self._fetch_one(stmt, values)
        assert stored is not None
        return cast(T, plan.make(stored))

    @_translating
    def upsert_many(
        self,
        rows: Iterable[Any],
        conflict: Sequence[str] | None = None,
        *,
        update: Sequence[str] | None = None,
        chunk_size: int = DEFAULT_UPSERT_CHUNK,
    ) -> int:
        """``upsert`` for many rows; returns the number of rows written.

        Rows with the same key in the input: the last one wins (PostgreSQL refuses to
        touch a row twice in one statement, so they are merged before sending); a key
        with a NULL matches nothing, so those rows are each inserted.  Rows are
        written in key order, so two writers on overlapping keys take their row locks in
        the same order and wait for each other instead of deadlocking.  All in one
        transaction (the ambient one, or its own):

        - up to ``COPY_UPSERT_ROWS`` rows: ``INSERT … SELECT FROM unnest(:arrays) ON
          CONFLICT DO UPDATE``, one statement per ``chunk_size`` rows;
        - more (or a column that is itself an array, which unnest would flatten): COPY into
          a temporary table, then one ``INSERT … SELECT … ORDER BY key ON CONFLICT DO
          UPDATE`` — the cheapest path by far on the client side."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        plan = self.table_plan
        keys = self._conflict_keys(conflict)
        if update is not None:
            plan.check_names(update)
        latest: dict[tuple[Any, ...], dict[str, Any]] = {}
        key_of = tuple_getter(keys)
        nulls = itertools.count()
        for row in rows:
            values = plan.values_of(row)
            try:
                key = key_of(values)
                if any(v is None for v in key):
                    # NULL equals nothing, not even NULL: such rows never conflict, so they
                    # are never merged either (a NOT NULL key column rejects each of them).
                    key = (*key, next(nulls))
                latest[key] = values
            except KeyError:
                require_keys(values, keys, plan.name)
                raise
            except TypeError as error:
                raise ValueError(f"conflict key values must be hashable: {error}") from None
        if not latest:
            return 0
        steps = self._upsert_steps(latest, keys, update, chunk_size)
        with self._writing(single=len(steps) == 1 and steps[0].single) as conn:
            for step in steps:
                step.run(conn)
        return len(latest)  # DO UPDATE without a WHERE writes every (de-duplicated) row

    @_translating
    def merge_from_staging(
        self,
        staging: sa.Table | str,
        *,
        order_by: str,
        conflict: Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        update: Sequence[str] | None = None,
        on_conflict: OnConflict = "update",
        rejects: sa.Table | str | None = None,
        reason_column: str = "reason",
        chunk_size: int = DEFAULT_MERGE_CHUNK,
        after: Any = None,
        retries: int = 3,
        on_chunk: Callable[[MergeChunk], None] | None = None,
    ) -> MergeResult:
        """Merge a staging table (loaded by ``bulk_load``/COPY, typically all text) into
        this table, set-based, one transaction per ``chunk_size`` staging rows; the rows
        the table would refuse go to ``rejects`` with the reason instead of failing the
        chunk.  Returns the counts (``MergeResult``).

        - ``order_by``: a unique column of staging (the input line) that orders the
          records and names them in ``rejects``; ``after=`` resumes past a value.
        - ``columns``: the columns to set, from staging columns of the same name
          (default: every column staging has, but identity, generated and hook columns).
          Text bound for another type is checked to parse as it.
        - ``conflict`` (default: the primary key) and ``on_conflict``: ``"update"`` (the
          ``update`` columns, default all merged ones; rows already equal are not
          written, so a re-run changes nothing; of several records of one key the last
          wins), ``"skip"`` (keep the table's row) or ``"reject"`` (refuse the record).
        - ``rejects``: a table with a text ``reason_column``, the ``order_by`` column and
          any staging columns worth keeping (filled by name); a chunk's earlier rejects
          are replaced when it runs again.  Without one, ``result.rejected_rows`` lists
          ``(order value, reason)``.

        Refusals predicted in SQL: NOT NULL, CHECK constraints, values that do not parse,
        foreign keys, unique keys against the table and within the input.  Failures no
        query predicts (triggers, exclusion constraints, concurrent writers) are pinned on
        rows by bisecting the chunk in savepoints.  Inside a transaction block, each
        chunk is a savepoint of it.  Details: ``dbkit.repository.merge``."""
        return merge.merge_from_staging(
            self,
            staging,
            order_by=order_by,
            conflict=conflict,
            columns=columns,
            update=update,
            on_conflict=on_conflict,
            rejects=rejects,
            reason_column=reason_column,
            chunk_size=chunk_size,
            after=after,
            retries=retries,
            on_chunk=on_chunk,
        )

    @_translating
    def update(
        self,
        pk: Any,
        /,
        *,
        expected_version: Any = None,
        include_deleted: bool = False,
        **values: Any,
    ) -> T:
        """Set columns of the row with primary key ``pk``; returns the updated row.
        ``NotFoundError`` when there is no such row; with ``expected_version`` (repositories
        with a ``version_column``), ``ConflictError`` when the row is at another version."""
        plan = self.table_plan
        changes = self._changes(values)
        params = self._pk_params(pk)
        stmt = (
            sa.update(self.table)
            .where(plan.by_pk, *self._visible(include_deleted))
            .values(**changes, **plan.update_extras)
            .returning(*plan.columns)
        )
        if expected_version is not None:
            if plan.version is None:
                raise ValueError(
                    f"expected_version needs a version_column on {type(self).__qualname__}"
                )
            stmt = stmt.where(plan.version == expected_version)
        row = self._fetch_one(stmt, params)
        if row is None:
            raise self._missing_or_stale(pk, params, expected_version, include_deleted)
        return cast(T, plan.make(row))

    @_translating
    def update_where(self, where: Filter, *, include_deleted: bool = False, **values: Any) -> int:
        """Set columns of every row matching ``where`` (``sa.true()`` for all rows);
        returns how many were updated."""
        conditions = self._conditions((where,), {}, include_deleted)
        changes = self._changes(values)
        stmt = (
            sa.update(self.table)
            .where(*conditions)
            .values(**changes, **self.table_plan.update_extras)
        )
        return self._rowcount(stmt)

    @_translating
    def delete(self, pk: Any) -> bool:
        """Delete the row with primary key ``pk`` (soft delete: mark it); False when there
        was no such (visible) row."""
        plan = self.table_plan
        stmt = plan.soft_delete_by_pk if plan.deleted is not None else plan.delete_by_pk
        return self._rowcount(stmt, self._pk_params(pk)) > 0

    @_translating
    def delete_where(self, *where: Filter, **eq: Any) -> int:
        """Delete (or soft-delete) every row matching the filters; returns how many.
        Without any filter it refuses: pass ``sa.true()`` to really mean every row."""
        if not where and not eq:
            raise ValueError(
                f"delete_where() without a condition would delete every row of "
                f"{self.table_plan.name!r}; pass sqlalchemy.true() if that is what you mean"
            )
        plan = self.table_plan
        conditions = self._conditions(where, eq, include_deleted=False)
        if plan.deleted is None:
            stmt: sa.Executable = sa.delete(self.table).where(*conditions)
        else:
            marks = {plan.deleted.key: sa.func.now(), **plan.update_extras}
            stmt = sa.update(self.table).where(*conditions).values(marks)
        return self._rowcount(stmt)

    @_translating
    def hard_delete(self, pk: Any) -> bool:
        """Really delete the row with primary key ``pk``, soft-deleted or not."""
        return self._rowcount(self.table_plan.delete_by_pk, self._pk_params(pk)) > 0

    @_translating
    def restore(self, pk: Any) -> T:
        """Bring back a soft-deleted row (a no-op for a live one); returns it."""
        plan = self.table_plan
        if plan.deleted is None:
            raise TypeError(f"{type(self).__qualname__} has no soft_delete_column")
        stmt = (
            sa.update(self.table)
            .where(plan.by_pk)
            .values({plan.deleted.key: None, **plan.update_extras})
            .returning(*plan.columns)
        )
        row = self._fetch_one(stmt, self._pk_params(pk))
        if row is None:
            raise self._not_found(pk)
        return cast(T, plan.make(row))

    # -- statements ------------------------------------------------------------------------

    def _visible(self, include_deleted: bool) -> tuple[sa.ColumnElement[bool], ...]:
        alive = self.table_plan.alive
        return () if alive is None or include_deleted else (alive,)

    def _conditions(
        self,
        where: Sequence[Any],
        eq: Mapping[str, Any],
        include_deleted: bool,
    ) -> builtins.list[sa.ColumnElement[bool] | sa.TextClause]:
        conditions: builtins.list[sa.ColumnElement[bool] | sa.TextClause] = []
        for clause in where:
            # Strings are refused: raw SQL must be spelled sa.text(...) to be accepted.
            if not isinstance(clause, (sa.ColumnElement, sa.TextClause)):
                raise ValueError(
                    f"filters must be SQLAlchemy expressions such as repo.c.name == value, "
                    f"not {type(clause).__name__} {clause!r}"
                )
            conditions.append(clause)
        column = self.table_plan.column
        conditions.extend(column(name) == value for name, value in eq.items())
        conditions.extend(self._visible(include_deleted))
        return conditions

    def _select(
        self, where: Sequence[Any], eq: Mapping[str, Any], include_deleted: bool
    ) -> sa.Select[Any]:
        return sa.select(*self.table_plan.columns).where(
            *self._conditions(where, eq, include_deleted)
        )

    def _order_clauses(self, order_by: OrderBy) -> builtins.list[sa.ColumnElement[Any]]:
        clauses: builtins.list[sa.ColumnElement[Any]] = []
        for key in keys_of(order_by):
            if isinstance(key, str):
                desc = key.startswith("-")
                col = self.table_plan.column(key[1:] if desc else key)
                clauses.append(col.desc() if desc else col.asc())
            elif isinstance(key, sa.ColumnElement):
                self._own_column(key)
                clauses.append(key)
            else:
                raise ValueError(f"order_by takes column names or expressions, not {key!r}")
        return clauses

    def _own_column(self, expr: sa.ColumnElement[Any]) -> None:
        """A plain column in ``order_by`` must belong to this table."""
        inner = descending(expr)
        col = inner[0] if inner is not None else expr
        if isinstance(col, sa.Column) and col.table is not self.table:
            raise ValueError(f"column {col} is not a column of table {self.table_plan.name!r}")

    def _keyset(self, order_by: OrderBy) -> builtins.list[tuple[sa.Column[Any], bool]]:
        keys: builtins.list[tuple[sa.Column[Any], bool]] = []
        for key in keys_of(order_by):
            if isinstance(key, str):
                desc = key.startswith("-")
                keys.append((self.table_plan.column(key[1:] if desc else key), desc))
                continue
            inner = descending(key) if isinstance(key, sa.ColumnElement) else None
            if (
                inner is None
                or not isinstance(inner[0], sa.Column)
                or inner[0].table is not self.table
            ):
                raise ValueError(
                    "page() orders by columns of its own table: names, '-name', col, "
                    f"col.asc() or col.desc(); got {key!r}"
                )
            keys.append((inner[0], inner[1]))
        nullable = [col.key for col, _ in keys if col.nullable]
        if nullable:
            raise ValueError(
                f"page() cannot order by nullable column(s) {', '.join(nullable)}: keyset "
                "pagination compares values and NULL compares to nothing"
            )
        seen = {col.key for col, _ in keys}
        last_desc = keys[-1][1] if keys else False
        keys.extend((col, last_desc) for col in self.table_plan.pk if col.key not in seen)
        return keys

    def _conflict_keys(self, conflict: Sequence[str] | None) -> builtins.list[str]:
        if conflict is None:
            return builtins.list(self.table_plan.pk_keys)
        if isinstance(conflict, str):
            conflict = (conflict,)
        keys = builtins.list(conflict)
        if not keys:
            raise ValueError("conflict needs at least one column")
        self.table_plan.check_names(keys)
        return keys

    def _conflict_set(
        self,
        insert: pg.Insert,
        columns: Iterable[str],
        keys: Sequence[str],
        update: Sequence[str] | None,
    ) -> dict[str, Any]:
        """``SET`` of ``ON CONFLICT DO UPDATE``: the proposed values (``excluded.col``) of
        the given columns outside the key and the primary key, never ``created_at``."""
        plan = self.table_plan
        if update is not None:
            plan.check_names(update)
            targets = [c for c in update if c not in plan.managed]
        else:
            skip = {*keys, *plan.pk_keys, *plan.managed}
            targets = [c for c in columns if c not in skip]
        assignments: dict[str, Any] = {c: insert.excluded[c] for c in targets}
        assignments.update(plan.update_extras)
        if plan.deleted is not None and update is None and plan.deleted.key not in columns:
            assignments[plan.deleted.key] = None  # an upsert brings a deleted row back
        if not assignments:  # nothing to change: still lock and return the existing row
            assignments[keys[0]] = insert.excluded[keys[0]]
        return assignments

    def _upsert_steps(
        self,
        latest: Mapping[tuple[Any, ...], dict[str, Any]],
        keys: Sequence[str],
        update: Sequence[str] | None,
        chunk_size: int,
    ) -> builtins.list[UpsertStep]:
        """The statements of one upsert_many: rows grouped by the columns they give, each
        group through unnest() chunks or one COPY-and-merge."""
        groups: dict[tuple[str, ...], builtins.list[tuple[tuple[Any, ...], dict[str, Any]]]] = {}
        for key, values in latest.items():
            groups.setdefault(tuple(values), []).append((key, values))
        steps: builtins.list[UpsertStep] = []
        table = self.table
        for columns, items in groups.items():
            has_array = any(isinstance(table.c[c].type, sa.ARRAY) for c in columns)
            if len(items) > bulk.COPY_UPSERT_ROWS or has_array:
                rows = [values for _, values in items]
                steps.append(CopyUpsert(self, columns, rows, keys, update))
                continue
            sort_by_key(items)
            stmt = self._unnest_upsert(columns, keys, update)
            for start in range(0, len(items), chunk_size):
                chunk = [values for _, values in items[start : start + chunk_size]]
                arrays = {
                    f"_dbkit_c{i}": [row[name] for row in chunk] for i, name in enumerate(columns)
                }
                steps.append(UpsertStatement(stmt, arrays))
        return steps

    def _unnest_upsert(
        self, columns: tuple[str, ...], keys: Sequence[str], update: Sequence[str] | None
    ) -> sa.Executable:
        """``INSERT … SELECT … FROM unnest(:_dbkit_c0, :_dbkit_c1, …) ON CONFLICT …``: one
        array parameter per column, one statement whatever the number of rows.  Built once
        per shape: statements hold no values, only bind parameters."""
        cache_key = (columns, tuple(keys), None if update is None else tuple(update))
        cached = self.table_plan.unnest_upserts.get(cache_key)
        if cached is not None:
            return cached
        table = self.table
        arrays = [
            sa.bindparam(f"_dbkit_c{i}", type_=pg.ARRAY(table.c[name].type))
            for i, name in enumerate(columns)
        ]
        source = (
            sa.func.unnest(*arrays)
            .table_valued(*(sa.column(table.c[name].name, table.c[name].type) for name in columns))
            .render_derived(name="dbkit_rows")
        )
        stmt = self.merge_statement(source, columns, keys, update, order=False)
        self.table_plan.unnest_upserts[cache_key] = stmt
        return stmt

    def merge_statement(
        self,
        source: sa.FromClause,
        columns: Sequence[str],
        keys: Sequence[str],
        update: Sequence[str] | None,
        *,
        order: bool,
    ) -> sa.Executable:
        """``INSERT INTO table (columns, hook columns) SELECT … FROM source [ORDER BY key]
        ON CONFLICT (key) DO UPDATE SET …``; source columns carry the table's column names."""
        plan = self.table_plan
        table = self.table
        names = [table.c[c].name for c in columns]
        select = sa.select(*(source.c[n] for n in names), *plan.insert_extras.values())
        if order:  # lock order for writers of overlapping keys
            select = select.order_by(*(source.c[table.c[k].name] for k in keys))
        insert = pg.insert(table).from_select([*columns, *plan.insert_extras], select)
        return insert.on_conflict_do_update(
            index_elements=[table.c[k] for k in keys],
            set_=self._conflict_set(insert, columns, keys, update),
        )

    def _changes(self, values: Mapping[str, Any]) -> dict[str, Any]:
        plan = self.table_plan
        plan.check_names(values)
        changes = {k: v for k, v in values.items() if k not in plan.managed}
        if not changes:
            raise ValueError(
                "nothing to update: pass column=value keywords"
                + (
                    f" ({', '.join(sorted(plan.managed))} are set by the repository)"
                    if plan.managed
                    else ""
                )
            )
        return changes

    def _pk_params(self, pk: Any) -> dict[str, Any]:
        """Bind parameters of ``by_pk`` for a scalar, tuple or mapping key."""
        plan = self.table_plan
        if plan.scalar_pk is not None and type(pk) in _SCALAR_KEYS:
            return {plan.scalar_pk: pk}
        if isinstance(pk, Mapping):
            if set(pk) != set(plan.pk_keys):
                raise ValueError(
                    f"primary key of {plan.name!r} is ({', '.join(plan.pk_keys)}), got "
                    f"keys {', '.join(map(repr, pk))}"
                )
            values = tuple(pk[k] for k in plan.pk_keys)
        elif len(plan.pk) == 1:
            values = (pk[0],) if isinstance(pk, tuple) and len(pk) == 1 else (pk,)
        elif isinstance(pk, (tuple, builtins.list)) and len(pk) == len(plan.pk):
            values = tuple(pk)
        else:
            raise ValueError(
                f"primary key of {plan.name!r} is ({', '.join(plan.pk_keys)}): pass a "
                f"tuple or mapping of {len(plan.pk)} values, got {pk!r}"
            )
        if any(v is None for v in values):
            raise ValueError(f"primary key values cannot be None, got {pk!r}")
        return {p.key: v for p, v in zip(plan.pk_params, values, strict=True)}

    def _not_found(self, pk: Any) -> NotFoundError:
        plan = self.table_plan
        return NotFoundError(f"no row in {plan.name!r} with ({', '.join(plan.pk_keys)}) = {pk!r}")

    def _missing_or_stale(
        self, pk: Any, params: dict[str, Any], expected: Any, include_deleted: bool
    ) -> Exception:
        """After an UPDATE that touched nothing: was the row gone, or at another version?"""
        plan = self.table_plan
        if expected is None or plan.version is None:
            return self._not_found(pk)
        stmt = sa.select(plan.version).where(plan.by_pk, *self._visible(include_deleted))
        rows = self._fetch(stmt, params)
        if not rows:
            return self._not_found(pk)
        actual = rows[0][0]
        return ConflictError(
            f"row of {plan.name!r} with ({', '.join(plan.pk_keys)}) = {pk!r} is at version "
            f"{actual!r}, not the expected {expected!r}: it was changed since it was read",
            table=plan.name,
            key=pk,
            expected=expected,
            actual=actual,
        )

    # -- running ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _statement(self) -> Iterator[DbkitConnection]:
        """The connection for one writing statement: the ambient one, else one in
        autocommit (and replicas are then told a write committed)."""
        ambient = self._db.connection()
        if ambient is not None:
            yield ambient
        else:
            with self._db.autocommit() as conn:
                yield conn
            self._db.note_write()

    def _writing(self, *, single: bool) -> contextlib.AbstractContextManager[DbkitConnection]:
        """One statement: as ``_statement``.  Several: one transaction, joined (no
        savepoint) when a block is open, so a failure breaks that block like any failed
        statement would."""
        if single:
            return self._statement()
        return self._db.transaction(savepoint=False)

    def _run(self, stmt: sa.Executable, use: Callable[[DbkitConnection], R]) -> R:
        """``use(conn)`` for one statement: on the ambient connection, else in autocommit,
        where a read that meets a dead pooled connection runs again on a fresh one."""
        ambient = self._db.connection()
        if ambient is not None:
            return use(ambient)
        if is_read(stmt):  # to a replica when read_from allows (dbkit.replicas)
            return self._db.run_read(lambda db: db.run_autocommit(use, retry=db is self._db))
        result = self._db.run_autocommit(use, retry=False)
        self._db.note_write()
        return result

    def _fetch(self, stmt: sa.Executable, params: Any = None) -> Sequence[Row[Any]]:
        return self._run(stmt, lambda conn: conn.execute(stmt, params).all())

    def _fetch_one(self, stmt: sa.Executable, params: Any = None) -> Row[Any] | None:
        return self._run(stmt, lambda conn: conn.execute(stmt, params).first())

    def _scalar(self, stmt: sa.Executable, params: Any = None) -> Any:
        return self._run(stmt, lambda conn: conn.execute(stmt, params).scalar())

    def _rowcount(self, stmt: sa.Executable, params: Any = None) -> int:
        return self._run(stmt, lambda conn: int(conn.execute(stmt, params).rowcount))

    def _fast_get(self, db: Database, include_deleted: bool) -> FastGet | None:
        """The driver-level get for ``db``'s current engine (it declines when
        instrumented), or None when fast paths are off."""
        path = db.driver_path()
        if path is None:
            return None
        key = (include_deleted, id(path))
        fast = self._fast_gets.get(key)
        if fast is None or fast.path is not path:  # first use, or reconnected
            plan = self.table_plan
            stmt = plan.get_any if include_deleted else plan.get_visible
            keys = [(p.key, c) for p, c in zip(plan.pk_params, plan.pk, strict=True)]
            fast = self._fast_gets[key] = FastGet(path, stmt, plan.columns, keys)
        return fast

    def _stream(self, stmt: sa.Select[Any], batch_size: int) -> Generator[T, None, None]:
        make_all = self.table_plan.make_all
        try:
            with self._stream_connection() as conn:
                if self._db.driver_path() is None or instrumented(conn.engine):
                    options = {"yield_per": batch_size}
                    with conn.execute(stmt, execution_options=options) as result:
                        for batch in result.partitions():
                            yield from make_all(batch)
                    return
                for rows in driver_stream(conn, stmt, self.table_plan.columns, batch_size):
                    yield from make_all(rows)
        except (sa_exc.DBAPIError, psycopg.Error) as exc:
            error = translate(exc, self.constraint_errors)
            if error is exc:
                raise
            raise error from exc

    @contextlib.contextmanager
    def _stream_connection(self) -> Iterator[DbkitConnection]:
        ambient = self._db.connection()
        if ambient is not None:
            yield ambient
            return
        # A private connection, not the thread's ambient transaction: two streams can be
        # interleaved, and writes made while iterating do not join the stream's snapshot.
        # A read: from a replica when read_from allows.
        conn = self._db.run_read(lambda db: db.checkout())
        try:
            transaction = conn.begin()
            try:
                yield conn
            except BaseException:  # GeneratorExit too: the stream was closed early
                rollback_quietly(transaction, conn)
                raise
            transaction.commit()
        finally:
            conn.close()
