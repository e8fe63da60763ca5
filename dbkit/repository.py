"""``Repository[T]``: one subclass per table, PostgreSQL's fast paths behind plain methods.

A repository is a ``sqlalchemy.Table`` (``table``), an optional row type (``model``: a
dataclass or any class built from keyword arguments; without one, rows are dicts) and the
opt-in hooks users keep asking for (``timestamps``, ``soft_delete_column``,
``version_column``).  What each method sends:

==================  ========================================================================
get                 SELECT by primary key; outside a transaction straight on the pooled
                    driver connection in autocommit (one round trip, no BEGIN/COMMIT)
stream              server-side cursor (DECLARE/FETCH), bounded memory
list/count/exists   SELECT … / SELECT count(*) / SELECT EXISTS (…)
add, add_many       INSERT … RETURNING; many rows through insertmanyvalues, in input order
insert_many         executemany without RETURNING (psycopg pipelines it)
bulk_load           COPY … FROM STDIN on the transaction's own driver connection, streamed
upsert(_many)       INSERT … ON CONFLICT DO UPDATE; many rows de-duplicated (last wins),
                    written in key order (no deadlock between two writers): unnest()
                    arrays for small inputs, COPY into a temporary table and one
                    INSERT … SELECT for large ones
update, delete      UPDATE/DELETE … WHERE pk RETURNING; soft delete is an UPDATE
page                keyset pagination: (k1, …, pk) > (v1, …, pk_v), primary key as tie-breaker
==================  ========================================================================

Transactions: every call runs on this thread's ambient transaction when a
``db.transaction()`` block is open.  Outside one, a single statement runs in autocommit and
a multi-statement operation (add_many, insert_many, bulk_load, chunked upserts) in a
transaction of its own; ``stream`` keeps its own transaction open while it is iterated.

Input safety: column names (filters, ``order_by``, values, ``columns``) are checked against
the table before any SQL is built; every value is a bound parameter; ``like()`` escapes
``%`` and ``_``.  Errors: integrity violations come out as ``DuplicateKeyError``,
``ForeignKeyError`` or ``IntegrityError`` (``dbkit.errors.translate``), or as the
subclass's own classes through ``constraint_errors``.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import inspect
import itertools
import operator
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, cast

import psycopg
import sqlalchemy as sa
from psycopg import sql as pgsql
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Dialect, Row
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql import operators
from sqlalchemy.sql.base import ReadOnlyColumnCollection

from dbkit.errors import (
    ConflictError,
    ConnectError,
    MultipleResultsError,
    NotFoundError,
    PoolTimeoutError,
    TransactionBroken,
    translate,
)

if TYPE_CHECKING:
    from dbkit.database import Database
    from dbkit.transaction import DbkitConnection

__all__ = ["Page", "Repository"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# A filter: a SQLAlchemy boolean expression (repo.c.age > 18), or explicit sa.text(...).
Filter = sa.ColumnElement[bool] | sa.TextClause
# One ordering key: "name", "-name" (descending), or a column expression of the table.
OrderKey = str | sa.ColumnElement[Any]
OrderBy = OrderKey | Sequence[OrderKey] | None

# Rows per unnest() statement in upsert_many: large enough that per-statement costs vanish,
# small enough that one statement's arrays stay a few MB.
DEFAULT_UPSERT_CHUNK = 5000

_PK_PARAM = "_dbkit_pk_{}"
_SCALAR_KEYS = frozenset({int, str, uuid.UUID})


@dataclass(frozen=True)
class Page(Generic[T]):
    """One keyset page: ``items``, and ``next_after`` to pass as ``after=`` for the next
    page (the sort-key values of the last item, primary key included); None at the end."""

    items: list[T]
    next_after: tuple[Any, ...] | None

    @property
    def has_next(self) -> bool:
        return self.next_after is not None


# --------------------------------------------------------------------------------------
# Errors


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


# --------------------------------------------------------------------------------------
# Model mapping


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


class _Plan:
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


# --------------------------------------------------------------------------------------
# Ordering and keyset conditions


def _descending(expr: sa.ColumnElement[Any]) -> tuple[sa.ColumnElement[Any], bool] | None:
    """(column, descending) for ``col``, ``col.asc()``, ``col.desc()``; else None."""
    if isinstance(expr, sa.UnaryExpression) and expr.modifier in (
        operators.asc_op,
        operators.desc_op,
    ):
        return expr.element, expr.modifier is operators.desc_op
    if isinstance(expr, sa.UnaryExpression):
        return None
    return expr, False


def _keys_of(order_by: OrderBy) -> builtins.list[OrderKey]:
    if order_by is None:
        return []
    if isinstance(order_by, (str, sa.ColumnElement)):
        return [order_by]
    return builtins.list(order_by)


def _after_clause(
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


_first = operator.itemgetter(0)


def _none_first(item: tuple[tuple[Any, ...], Any]) -> tuple[tuple[bool, Any], ...]:
    return tuple((v is not None, v) for v in item[0])


def _sort_by_key(items: builtins.list[tuple[tuple[Any, ...], Any]]) -> None:
    """Sort (key, row) pairs by key, the order in which upserts take their row locks.
    A None in a key (which never conflicts) sorts first; keys that do not compare at all
    (mixed types) keep their input order."""
    try:
        items.sort(key=_first)
    except TypeError:
        with contextlib.suppress(TypeError):
            items.sort(key=_none_first)


# --------------------------------------------------------------------------------------
# Straight on the driver: get() outside a transaction, and stream()
#
# For these two, SQLAlchemy's per-statement and per-row machinery costs more than the work
# itself (a primary-key round trip; building a Row per streamed row), so they run the SQL
# SQLAlchemy compiled on the pooled psycopg connection.  What SQLAlchemy would add is kept:
# bind and result processors, dbkit's statement metrics, errors wrapped as DBAPIError,
# invalidation of a connection found dead.  When someone instruments SQLAlchemy's cursor
# events (tracing), both stay on SQLAlchemy's path so those events still see everything.


def _instrumented(engine: sa.Engine) -> bool:
    dispatch = engine.dispatch
    return bool(dispatch.before_cursor_execute or dispatch.after_cursor_execute)


def _observe(
    conn: DbkitConnection, started: float, error: BaseException | None, sql: str, params: Any
) -> None:
    observer = getattr(conn, "_dbkit_observer", None)
    if observer is not None:
        observer.observe(time.perf_counter() - started, error, sql, (params,), conn.dialect)


def _driver_error(
    conn: DbkitConnection | PoolProxiedConnection,
    dialect: Dialect,
    error: psycopg.Error,
    sql: str,
    params: Any,
) -> sa_exc.DBAPIError:
    """The driver's error as SQLAlchemy would have raised it; a dead connection is
    invalidated so that the pool does not hand it out again."""
    try:
        pooled = conn if isinstance(conn, PoolProxiedConnection) else conn.connection
        driver = pooled.driver_connection
    except sa_exc.SQLAlchemyError:  # already invalidated
        driver = None
    invalidated = driver is not None and dialect.is_disconnect(cast(Any, error), driver, None)
    wrapped = sa_exc.DBAPIError.instance(
        sql,
        params,
        error,
        psycopg.Error,
        hide_parameters=True,
        connection_invalidated=invalidated,
        dialect=dialect,
    )
    if invalidated:
        conn.invalidate(wrapped)
    return cast(sa_exc.DBAPIError, wrapped)


Processors = builtins.list[Callable[[Any], Any] | None]


def _result_processors(
    columns: Sequence[sa.Column[Any]], description: Sequence[Any], dialect: Dialect
) -> Processors:
    """SQLAlchemy's result processors for these columns given the types the server sent;
    empty when no column needs one (the usual case with psycopg)."""
    found: Processors = [
        col.type.dialect_impl(dialect).result_processor(dialect, d.type_code)
        for col, d in zip(columns, description, strict=True)
    ]
    return found if any(found) else []


def _processed(rows: Sequence[Any], processors: Processors) -> builtins.list[tuple[Any, ...]]:
    return [tuple(p(v) if p else v for p, v in zip(processors, row, strict=True)) for row in rows]


class _FastGet:
    """``get`` outside a transaction: the statement compiled once, run in autocommit on the
    pool's DBAPI connection itself (no SQLAlchemy ``Connection`` around it), one round
    trip.  Metrics, bind/result processing and error wrapping as on the usual path."""

    def __init__(self, stmt: sa.Select[Any], plan: _Plan, db: Database) -> None:
        engine = db.engine
        self.db = db
        self.engine = engine
        self.dialect = dialect = engine.dialect
        self.observer = getattr(db, "_observer", None)  # dbkit's statement metrics
        self.sql = stmt.compile(dialect=dialect).string
        self.columns = plan.columns
        self.bind_processors = [
            (param.key, proc)
            for param, col in zip(plan.pk_params, plan.pk, strict=True)
            if (proc := col.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        self.result_processors: Processors | None = None  # known after the first row

    def fetch(self, params: dict[str, Any]) -> Sequence[Any] | None:
        for name, proc in self.bind_processors:
            params[name] = proc(params[name])
        pooled = _checkout_driver(self.db, self.engine)
        try:
            driver = pooled.driver_connection
            assert driver is not None
            driver.autocommit = True
            try:
                row, cursor = self._run(pooled, driver, params)
            finally:
                try:
                    driver.autocommit = False
                except psycopg.Error:  # never pool a half-configured connection
                    if pooled.dbapi_connection is not None:  # not invalidated already
                        pooled.invalidate()
        finally:
            pooled.close()
        if row is None:
            return None
        processors = self.result_processors
        if processors is None:  # cursor.description builds new objects on every access
            processors = _result_processors(self.columns, cursor.description or (), self.dialect)
            self.result_processors = processors
        return _processed((row,), processors)[0] if processors else row

    def _run(
        self, pooled: PoolProxiedConnection, driver: Any, params: dict[str, Any]
    ) -> tuple[Sequence[Any] | None, Any]:
        observer = self.observer
        started = time.perf_counter()
        try:
            cursor = driver.execute(self.sql, params)
            row = cursor.fetchone()
        except psycopg.Error as error:
            wrapped = _driver_error(pooled, self.dialect, error, self.sql, params)
            if observer is not None:
                observer.observe(
                    time.perf_counter() - started, wrapped, self.sql, (params,), self.dialect
                )
            raise wrapped from error
        if observer is not None:
            observer.observe(time.perf_counter() - started, None, self.sql, (params,), self.dialect)
        return row, cursor


def _checkout_driver(db: Database, engine: sa.Engine) -> PoolProxiedConnection:
    """A pooled DBAPI connection, with pool and connect failures in dbkit's terms.

    Mirrors ``Database._checkout`` minus the SQLAlchemy ``Connection`` (which costs about
    as much as the pool itself on a primary-key read); belongs in ``Database``."""
    try:
        return engine.raw_connection()
    except sa_exc.TimeoutError as error:
        config = db.config
        raise PoolTimeoutError(
            f"no connection became free within {config.timeout:g}s: {db.stats().in_use} in "
            f"use, max_open_conns={config.max_open_conns or 'unlimited'}, max_idle_conns="
            f"{config.max_idle_conns}; raise max_open_conns or look for connections held "
            "too long"
        ) from error
    except sa_exc.DBAPIError as error:
        reason = "; ".join(line.strip() for line in str(error.orig).splitlines() if line.strip())
        raise ConnectError(f"cannot connect to {db.config.safe_dsn()}: {reason}") from error


_cursor_names = itertools.count(1)


def _bind(processor: Any, value: Any) -> Any:
    if processor is None:
        return value
    if callable(processor):
        return processor(value)
    # A tuple-valued parameter (e.g. tuple_(...).in_(...)): one processor per element.
    return tuple(p(v) if p else v for p, v in zip(processor, value, strict=True))


def _driver_stream(
    conn: DbkitConnection,
    stmt: sa.Select[Any],
    columns: Sequence[sa.Column[Any]],
    batch_size: int,
) -> Iterator[Sequence[Sequence[Any]]]:
    """Batches of plain tuples from a psycopg server-side cursor (``DECLARE … CURSOR`` then
    ``FETCH FORWARD batch_size``), closed when the generator is."""
    dialect = conn.dialect
    compiled = stmt.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    binds = compiled._bind_processors  # what SQLAlchemy's execution context applies
    params = {
        key: _bind(binds.get(key), value) for key, value in compiled.construct_params().items()
    }
    sql = compiled.string
    driver = conn.connection.driver_connection
    assert driver is not None
    started = time.perf_counter()
    declared = False
    try:
        with driver.cursor(name=f"dbkit_stream_{next(_cursor_names)}") as cursor:
            cursor.execute(sql, params)
            declared = True
            _observe(conn, started, None, sql, params)
            processors = _result_processors(columns, cursor.description or (), dialect)
            while rows := cursor.fetchmany(batch_size):
                yield _processed(rows, processors) if processors else rows
    except psycopg.Error as error:
        wrapped = _driver_error(conn, dialect, error, sql, params)
        if not declared:  # metrics count statements, as DbkitConnection does
            _observe(conn, started, wrapped, sql, params)
        raise wrapped from error


# --------------------------------------------------------------------------------------
# The repository


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

    _plan: ClassVar[_Plan]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "table", None) is not None:
            cls._plan = _Plan(cls)

    def __init__(self, db: Database) -> None:
        if getattr(type(self), "_plan", None) is None:
            raise TypeError(f"{type(self).__qualname__} needs a `table = <sqlalchemy.Table>`")
        self._db = db
        self._fast_gets: dict[bool, _FastGet] = {}

    @property
    def db(self) -> Database:
        return self._db

    @property
    def c(self) -> ReadOnlyColumnCollection[str, sa.Column[Any]]:
        """The table's columns, for where-expressions: ``repo.c.age >= 18``."""
        return self.table.c

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} table={self._plan.name!r}>"

    # -- reading ---------------------------------------------------------------------------

    @_translating
    def get(self, pk: Any, *, include_deleted: bool = False) -> T:
        """The row with primary key ``pk`` (a scalar, or a tuple/mapping for a composite
        key); ``NotFoundError`` when there is none."""
        plan = self._plan
        params = self._pk_params(pk)
        ambient = self._db.connection()
        fast = None if ambient is not None else self._fast_get(include_deleted)
        if fast is not None:
            row = fast.fetch(params)
        else:
            row = self._fetch_one(plan.get_any if include_deleted else plan.get_visible, params)
        if row is None:
            raise self._not_found(pk)
        return cast(T, plan.make(row))

    @_translating
    def get_one_or_none(self, *where: Filter, include_deleted: bool = False, **eq: Any) -> T | None:
        """The one row matching the filters, None when none does; ``MultipleResultsError``
        when several do."""
        stmt = self._select(where, eq, include_deleted).limit(2)
        rows = self._fetch(stmt)
        if len(rows) > 1:
            raise MultipleResultsError(f"more than one row of {self._plan.name!r} matches")
        return cast(T, self._plan.make(rows[0])) if rows else None

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
        return builtins.list(self._plan.make_all(self._fetch(stmt)))

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
    ) -> Iterator[T]:
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
            conditions.append(_after_clause(keys, after))
        plan = self._plan
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
        col = self._plan.column(column)
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
        values = self._plan.values_of(obj)
        row = self._fetch_one(self._plan.insert.returning(*self._plan.columns), values)
        assert row is not None
        return cast(T, self._plan.make(row))

    @_translating
    def add_many(self, rows: Iterable[Any]) -> builtins.list[T]:
        """Insert rows and return them as stored, in input order (insertmanyvalues: one
        round trip per 1,000 rows, ``RETURNING`` sorted by parameter order)."""
        groups = self._plan.grouped(rows)
        if not groups:
            return []
        plan = self._plan
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
        groups = self._plan.grouped(rows)
        if not groups:
            return 0
        with self._writing(single=len(groups) == 1 and len(groups[0]) == 1) as conn:
            for group in groups:
                conn.execute(self._plan.insert, group)
        return sum(len(group) for group in groups)

    @_translating
    def bulk_load(self, rows: Iterable[Any], columns: Sequence[str] | None = None) -> int:
        """Load rows with ``COPY … FROM STDIN``, the fastest way into PostgreSQL; returns the
        number of rows loaded.  Rows may be mappings, model objects, or tuples in the order
        of ``columns`` (default: every column of the table).  The columns are taken from
        ``columns`` or the first row.  An iterator is streamed, never held in memory.

        All or nothing: the COPY runs in the ambient transaction or in its own."""
        iterator = iter(rows)
        first = next(iterator, _END)
        if first is _END:
            return 0
        copy = _CopyPlan(self._plan, first, columns)
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
        plan = self._plan
        keys = self._conflict_keys(conflict)
        values = plan.values_of(row)
        _require(values, keys, plan.name)
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
        touch a row twice in one statement, so they are merged before sending).  Rows are
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
        plan = self._plan
        keys = self._conflict_keys(conflict)
        if update is not None:
            plan.check_names(update)
        latest: dict[tuple[Any, ...], dict[str, Any]] = {}
        key_of = _getter(keys)
        for row in rows:
            values = plan.values_of(row)
            try:
                latest[key_of(values)] = values
            except KeyError:
                _require(values, keys, plan.name)
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
        plan = self._plan
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
            sa.update(self.table).where(*conditions).values(**changes, **self._plan.update_extras)
        )
        return self._rowcount(stmt)

    @_translating
    def delete(self, pk: Any) -> bool:
        """Delete the row with primary key ``pk`` (soft delete: mark it); False when there
        was no such (visible) row."""
        plan = self._plan
        stmt = plan.soft_delete_by_pk if plan.deleted is not None else plan.delete_by_pk
        return self._rowcount(stmt, self._pk_params(pk)) > 0

    @_translating
    def delete_where(self, *where: Filter, **eq: Any) -> int:
        """Delete (or soft-delete) every row matching the filters; returns how many.
        Without any filter it refuses: pass ``sa.true()`` to really mean every row."""
        if not where and not eq:
            raise ValueError(
                f"delete_where() without a condition would delete every row of "
                f"{self._plan.name!r}; pass sqlalchemy.true() if that is what you mean"
            )
        plan = self._plan
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
        return self._rowcount(self._plan.delete_by_pk, self._pk_params(pk)) > 0

    @_translating
    def restore(self, pk: Any) -> T:
        """Bring back a soft-deleted row (a no-op for a live one); returns it."""
        plan = self._plan
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
        alive = self._plan.alive
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
        column = self._plan.column
        conditions.extend(column(name) == value for name, value in eq.items())
        conditions.extend(self._visible(include_deleted))
        return conditions

    def _select(
        self, where: Sequence[Any], eq: Mapping[str, Any], include_deleted: bool
    ) -> sa.Select[Any]:
        return sa.select(*self._plan.columns).where(*self._conditions(where, eq, include_deleted))

    def _order_clauses(self, order_by: OrderBy) -> builtins.list[sa.ColumnElement[Any]]:
        clauses: builtins.list[sa.ColumnElement[Any]] = []
        for key in _keys_of(order_by):
            if isinstance(key, str):
                desc = key.startswith("-")
                col = self._plan.column(key[1:] if desc else key)
                clauses.append(col.desc() if desc else col.asc())
            elif isinstance(key, sa.ColumnElement):
                self._own_column(key)
                clauses.append(key)
            else:
                raise ValueError(f"order_by takes column names or expressions, not {key!r}")
        return clauses

    def _own_column(self, expr: sa.ColumnElement[Any]) -> None:
        """A plain column in ``order_by`` must belong to this table."""
        inner = _descending(expr)
        col = inner[0] if inner is not None else expr
        if isinstance(col, sa.Column) and col.table is not self.table:
            raise ValueError(f"column {col} is not a column of table {self._plan.name!r}")

    def _keyset(self, order_by: OrderBy) -> builtins.list[tuple[sa.Column[Any], bool]]:
        keys: builtins.list[tuple[sa.Column[Any], bool]] = []
        for key in _keys_of(order_by):
            if isinstance(key, str):
                desc = key.startswith("-")
                keys.append((self._plan.column(key[1:] if desc else key), desc))
                continue
            inner = _descending(key) if isinstance(key, sa.ColumnElement) else None
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
        keys.extend((col, last_desc) for col in self._plan.pk if col.key not in seen)
        return keys

    def _conflict_keys(self, conflict: Sequence[str] | None) -> builtins.list[str]:
        if conflict is None:
            return builtins.list(self._plan.pk_keys)
        if isinstance(conflict, str):
            conflict = (conflict,)
        keys = builtins.list(conflict)
        if not keys:
            raise ValueError("conflict needs at least one column")
        self._plan.check_names(keys)
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
        plan = self._plan
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
    ) -> builtins.list[_UpsertStep]:
        """The statements of one upsert_many: rows grouped by the columns they give, each
        group through unnest() chunks or one COPY-and-merge."""
        groups: dict[tuple[str, ...], builtins.list[tuple[tuple[Any, ...], dict[str, Any]]]] = {}
        for key, values in latest.items():
            groups.setdefault(tuple(values), []).append((key, values))
        steps: builtins.list[_UpsertStep] = []
        table = self.table
        for columns, items in groups.items():
            has_array = any(isinstance(table.c[c].type, sa.ARRAY) for c in columns)
            if len(items) > COPY_UPSERT_ROWS or has_array:
                rows = [values for _, values in items]
                steps.append(_CopyUpsert(self, columns, rows, keys, update))
                continue
            _sort_by_key(items)
            stmt = self._unnest_upsert(columns, keys, update)
            for start in range(0, len(items), chunk_size):
                chunk = [values for _, values in items[start : start + chunk_size]]
                arrays = {
                    f"_dbkit_c{i}": [row[name] for row in chunk] for i, name in enumerate(columns)
                }
                steps.append(_Statement(stmt, arrays))
        return steps

    def _unnest_upsert(
        self, columns: tuple[str, ...], keys: Sequence[str], update: Sequence[str] | None
    ) -> sa.Executable:
        """``INSERT … SELECT … FROM unnest(:_dbkit_c0, :_dbkit_c1, …) ON CONFLICT …``: one
        array parameter per column, one statement whatever the number of rows."""
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
        return self._merge_from(source, columns, keys, update, order=False)

    def _merge_from(
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
        plan = self._plan
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
        plan = self._plan
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
        plan = self._plan
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
        return NotFoundError(
            f"no row in {self._plan.name!r} with ({', '.join(self._plan.pk_keys)}) = {pk!r}"
        )

    def _missing_or_stale(
        self, pk: Any, params: dict[str, Any], expected: Any, include_deleted: bool
    ) -> Exception:
        """After an UPDATE that touched nothing: was the row gone, or at another version?"""
        plan = self._plan
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
        """The connection for one statement: the ambient one, else one in autocommit."""
        ambient = self._db.connection()
        if ambient is not None:
            yield ambient
        else:
            with self._db._autocommit() as conn:
                yield conn

    def _writing(self, *, single: bool) -> contextlib.AbstractContextManager[DbkitConnection]:
        """One statement: as ``_statement``.  Several: one transaction, joined (no
        savepoint) when a block is open, so a failure breaks that block like any failed
        statement would."""
        if single:
            return self._statement()
        return self._db.transaction(savepoint=False)

    def _fetch(self, stmt: sa.Executable, params: Any = None) -> Sequence[Row[Any]]:
        with self._statement() as conn:
            return conn.execute(stmt, params).all()

    def _fetch_one(self, stmt: sa.Executable, params: Any = None) -> Row[Any] | None:
        with self._statement() as conn:
            return conn.execute(stmt, params).first()

    def _scalar(self, stmt: sa.Executable, params: Any = None) -> Any:
        with self._statement() as conn:
            return conn.execute(stmt, params).scalar()

    def _rowcount(self, stmt: sa.Executable, params: Any = None) -> int:
        with self._statement() as conn:
            return int(conn.execute(stmt, params).rowcount)

    def _fast_get(self, include_deleted: bool) -> _FastGet | None:
        """The driver-level get, unless SQLAlchemy's cursor events are instrumented."""
        fast = self._fast_gets.get(include_deleted)
        engine = self._db.engine
        if fast is None or fast.engine is not engine:  # first use, or db reconnected
            stmt = self._plan.get_any if include_deleted else self._plan.get_visible
            fast = self._fast_gets[include_deleted] = _FastGet(stmt, self._plan, self._db)
        return None if _instrumented(engine) else fast

    def _stream(self, stmt: sa.Select[Any], batch_size: int) -> Iterator[T]:
        make_all = self._plan.make_all
        try:
            with self._stream_connection() as conn:
                if _instrumented(self._db.engine):
                    options = {"yield_per": batch_size}
                    with conn.execute(stmt, execution_options=options) as result:
                        for batch in result.partitions():
                            yield from make_all(batch)
                    return
                for rows in _driver_stream(conn, stmt, self._plan.columns, batch_size):
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
        conn = self._db._checkout()
        try:
            with conn.begin():
                yield conn
        finally:
            conn.close()


# --------------------------------------------------------------------------------------
# upsert_many steps

# Above this many rows (per group of rows with the same columns), upsert_many goes through
# COPY and a temporary table: PostgreSQL parses COPY text far cheaper than psycopg dumps
# large text arrays (a regex per element), and the temporary table's DDL is paid once.
COPY_UPSERT_ROWS = 2000

_temp_names = itertools.count(1)


class _UpsertStep:
    single = False  # one statement, atomic on its own (no transaction needed)

    def run(self, conn: DbkitConnection) -> None:
        raise NotImplementedError


class _Statement(_UpsertStep):
    single = True

    def __init__(self, stmt: sa.Executable, params: Mapping[str, Any]) -> None:
        self.stmt = stmt
        self.params = params

    def run(self, conn: DbkitConnection) -> None:
        conn.execute(self.stmt, self.params)


class _CopyUpsert(_UpsertStep):
    """COPY the rows into a temporary table shaped like the target's columns, merge them
    with one ``INSERT … SELECT … ON CONFLICT``, drop the table."""

    def __init__(
        self,
        repo: Repository[Any],
        columns: tuple[str, ...],
        rows: Sequence[Mapping[str, Any]],
        keys: Sequence[str],
        update: Sequence[str] | None,
    ) -> None:
        self.repo = repo
        self.columns = columns
        self.rows = rows
        self.keys = keys
        self.update = update

    def run(self, conn: DbkitConnection) -> None:
        repo, table = self.repo, self.repo.table
        quote = conn.dialect.identifier_preparer.quote
        temp = f"dbkit_upsert_{next(_temp_names)}"
        names = [table.c[c].name for c in self.columns]
        conn.exec_driver_sql(
            f"CREATE TEMPORARY TABLE {quote(temp)} ON COMMIT DROP AS SELECT "
            f"{', '.join(map(quote, names))} FROM "
            f"{conn.dialect.identifier_preparer.format_table(table)} WITH NO DATA"
        )
        copy = _CopyPlan(repo._plan, self.rows[0], self.columns, stamp=False)
        copy.run(conn, self.rows, into=temp)
        source = sa.table(
            temp, *(sa.column(table.c[c].name, table.c[c].type) for c in self.columns)
        )
        conn.execute(repo._merge_from(source, self.columns, self.keys, self.update, order=True))
        conn.exec_driver_sql(f"DROP TABLE {quote(temp)}")


# --------------------------------------------------------------------------------------
# COPY


_END: Any = object()


def _getter(names: Sequence[str]) -> Callable[[Any], tuple[Any, ...]]:
    """``itemgetter`` that always returns a tuple, even for one name."""
    if len(names) == 1:
        (name,) = names
        return lambda row: (row[name],)
    return cast(Callable[[Any], tuple[Any, ...]], operator.itemgetter(*names))


def _require(values: Mapping[str, Any], keys: Sequence[str], table: str) -> None:
    missing = [k for k in keys if k not in values]
    if missing:
        raise ValueError(
            f"every row upserted into {table!r} needs its conflict key "
            f"({', '.join(keys)}); a row lacks {', '.join(missing)}"
        )


def _non_negative(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


class _CopyPlan:
    """How rows become COPY tuples: which columns, and the cheapest conversion that gets
    there (tuples that already fit pass through untouched)."""

    def __init__(
        self, plan: _Plan, first: Any, columns: Sequence[str] | None, *, stamp: bool = True
    ) -> None:
        self.plan = plan
        if isinstance(columns, str):
            columns = (columns,)
        if columns is not None:
            plan.check_names(columns)
            if len(set(columns)) != len(columns):
                raise ValueError(f"columns lists a column twice: {builtins.list(columns)}")
        if isinstance(first, Mapping):
            self.kind = "mapping"
            given = builtins.list(columns if columns is not None else first.keys())
            plan.check_names(given)
        elif isinstance(first, (tuple, builtins.list)) and not plan.is_model_type(first):
            self.kind = "sequence"
            given = builtins.list(columns if columns is not None else plan.table.c.keys())
        else:
            self.kind = "object"
            if columns is not None:
                given = builtins.list(columns)
            else:
                given = builtins.list(plan.values_of(first))  # None + default: left out
        self.given = given
        self.data = [c for c in given if c not in plan.managed]
        # Hook columns (timestamps, version) go last, their values added to every row.
        hooks = (plan.created, plan.updated, plan.version) if stamp else ()
        self.stamped = [c for c in hooks if c is not None]
        self.columns = [*self.data, *(c.key for c in self.stamped)]

    def run(self, conn: DbkitConnection, rows: Iterable[Any], into: str | None = None) -> int:
        """COPY the rows into the table (or the table named ``into``, with the same column
        names); returns how many were written."""
        plan = self.plan
        driver = conn.connection.driver_connection
        assert driver is not None
        stamps = self._stamps(conn)
        convert = self._converter(stamps, conn.dialect)
        table = plan.table
        target = pgsql.Identifier(*((into,) if into else filter(None, (table.schema, table.name))))
        names = pgsql.SQL(", ").join(pgsql.Identifier(table.c[c].name) for c in self.columns)
        statement = pgsql.SQL("COPY {} ({}) FROM STDIN").format(target, names)
        observer = getattr(conn, "_dbkit_observer", None)
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            with driver.cursor() as cursor:
                with cursor.copy(statement) as copy:
                    write = copy.write_row
                    if convert is None:
                        for row in rows:
                            write(row)
                    else:
                        for row in rows:
                            write(convert(row))
                return int(cursor.rowcount)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if observer is not None:
                text = statement.as_string(driver)
                seconds = time.perf_counter() - started
                observer.observe(seconds, error, text, (), conn.dialect)

    def _stamps(self, conn: DbkitConnection) -> tuple[Any, ...]:
        """The hook values for every row: the transaction's now() as each timestamp
        column's own type (so ``timestamp`` columns get the session's wall time, as an
        INSERT's now() would), and version 1."""
        version = self.plan.version
        times = [c for c in self.stamped if c is not version]
        found: dict[str, Any] = {}
        if times:
            query = sa.select(*(sa.cast(sa.func.now(), c.type) for c in times))
            found = dict(zip((c.key for c in times), conn.execute(query).one(), strict=True))
        return tuple(1 if c is version else found[c.key] for c in self.stamped)

    def _converter(
        self, stamps: tuple[Any, ...], dialect: Dialect
    ) -> Callable[[Any], Sequence[Any]] | None:
        plan = self.plan
        given, data = self.given, self.data
        kind = self.kind
        if kind == "mapping":
            pick: Callable[[Any], Sequence[Any]] = _getter(data)
            width = len(given)

            def from_mapping(row: Any) -> Sequence[Any]:
                if len(row) != width:
                    self._check_mapping(row)
                try:
                    return pick(row)
                except KeyError as missing:
                    raise ValueError(
                        f"a row for {plan.name!r} has no value for column {missing}; the "
                        "columns come from the first row (or columns=)"
                    ) from None
                except TypeError:
                    raise ValueError(_mixed_rows(row, "mappings")) from None

            convert: Callable[[Any], Sequence[Any]] | None = from_mapping
        elif kind == "sequence":
            width = len(given)
            keep = None if data == given else [given.index(c) for c in data]

            def from_sequence(row: Any) -> Sequence[Any]:
                if not isinstance(row, (tuple, builtins.list)) or len(row) != width:
                    raise ValueError(
                        f"a row for {plan.name!r} has {len(row)} values for {width} columns "
                        f"({', '.join(given)})"
                        if isinstance(row, (tuple, builtins.list))
                        else _mixed_rows(row, "tuples")
                    )
                return row if keep is None else tuple(row[i] for i in keep)

            convert = from_sequence
        else:
            attrs = cast(Callable[[Any], Any], operator.attrgetter(*data)) if data else None

            def from_object(row: Any) -> Sequence[Any]:
                if attrs is None:
                    return ()
                try:
                    found = attrs(row)
                except AttributeError as error:
                    raise ValueError(
                        f"a {type(row).__name__} row for {plan.name!r} lacks an attribute: {error}"
                    ) from None
                return found if len(data) > 1 else (found,)

            convert = from_object

        processors = [
            (i, proc)
            for i, name in enumerate(self.columns[: len(data)])
            if (proc := plan.table.c[name].type.dialect_impl(dialect).bind_processor(dialect))
        ]
        base = convert
        if base is not None and processors:

            def processed(row: Any) -> Sequence[Any]:
                values = builtins.list(base(row))
                for i, proc in processors:
                    values[i] = proc(values[i])
                return values

            convert = processed
        if stamps and convert is not None:
            inner = convert

            def stamped(row: Any) -> Sequence[Any]:
                return (*inner(row), *stamps)

            convert = stamped
        return convert

    def _check_mapping(self, row: Any) -> None:
        if not isinstance(row, Mapping):
            raise ValueError(_mixed_rows(row, "mappings"))
        self.plan.check_names(row.keys())
        extra = set(row) - set(self.given) - self.plan.managed
        if extra:
            raise ValueError(
                f"a row for {self.plan.name!r} has column(s) {', '.join(sorted(extra))} the "
                "first row did not have; the columns come from the first row (or columns=)"
            )


def _mixed_rows(row: Any, expected: str) -> str:
    return f"bulk_load rows must all be {expected}, got a {type(row).__name__}"
