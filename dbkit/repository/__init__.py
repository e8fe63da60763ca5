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
merge_from_staging  per chunk of a staging table, one INSERT … SELECT … ON CONFLICT with
                    CTEs that write the rows the table would refuse to a rejects table
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

The package, one job per module: ``base`` (the ``Repository`` class), ``plan`` (what a
class knows about its table: columns, model mapping, write values), ``keyset`` (``Page``,
ordering and keyset conditions), ``fastpath`` (driver-level ``get`` and ``stream``) and
``bulk`` (COPY and the steps of ``upsert_many``), ``merge`` (``merge_from_staging``: a
staging table merged set-based, with rejects) and ``catalog`` (what the server says about
a table's columns and constraints, which the merge judges rows by).
"""

from dbkit.repository.base import Filter as Filter
from dbkit.repository.base import Repository
from dbkit.repository.bulk import DEFAULT_UPSERT_CHUNK as DEFAULT_UPSERT_CHUNK
from dbkit.repository.keyset import OrderBy as OrderBy
from dbkit.repository.keyset import OrderKey as OrderKey
from dbkit.repository.keyset import Page
from dbkit.repository.merge import MergeChunk, MergeResult

__all__ = ["MergeChunk", "MergeResult", "Page", "Repository"]
