"""Local store: engine creation, explicit versioned schema creation, and dialect helpers.

SQLite (a file under the data dir) is the default; any SQLAlchemy URL works, PostgreSQL is tested.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from itertools import chain
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, create_engine, event, inspect, select
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from ..errors import SchemaVersionError, StoreError
from ..settings import normalize_db_url
from . import schema
from .schema import SCHEMA_VERSION, metadata

__all__ = [
    "EncodedRows",
    "Store",
    "open_store",
    "create_schema",
    "schema",
    "SCHEMA_VERSION",
    "redact_url",
    "make_engine",
]


TCF_VENDORS_META = "tcf_vendor_ids"


def redact_url(url: str) -> str:
    """The URL with any password masked, safe to print and to put in results."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - printing must never fail
        return url


_SQLITE_PAGE_SIZE = 32768
_SQLITE_POOL_SIZE = 16  # connections kept open (file databases)
_SQLITE_POOL_OVERFLOW = 48  # more at once, closed when returned: 64 = the service's worker threads
_MAX_PARAMS = 32766  # bound parameters per statement (SQLite's default limit since 3.32)
_JSON_CHUNK = 20_000  # rows per JSON text (Store.bulk_insert on SQLite)
_JSON_SAFE = frozenset({str, int, bool, type(None)})  # what JSON carries into SQLite unchanged


def _sqlite_ts(value: datetime) -> str:
    # isoformat always writes a 4-digit year and, with "microseconds", 26 characters before any
    # UTC offset: the same text as value.replace(tzinfo=None).isoformat(" ", "microseconds").
    return value.isoformat(" ", "microseconds")[:26]


def _sqlite_ts_from_iso(value: Any) -> str | None:
    # The common YYYY-MM-DDTHH:MM:SS.mmmZ form (JavaScript's toISOString, what Segment libraries
    # send): for a value fromisoformat accepts, the same text as _sqlite_ts of what it returns.
    # (The separators pin the layout down: fromisoformat also takes e.g. week dates.)
    if (
        type(value) is str
        and len(value) == 24
        and value[23] == "Z"
        and value[19] == "."
        and value[4] == value[7] == "-"
        and value[13] == value[16] == ":"
    ):
        return f"{value[:10]} {value[11:23]}000"
    return None


def _identity(value: Any) -> Any:
    return value


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Transactions are emitted by SQLAlchemy (see _sqlite_begin), not by pysqlite's implicit BEGIN,
    # which would make SAVEPOINTs (the host's per-batch atomicity inside a commit group) unreliable.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # Only effective on a new, empty database (before WAL is enabled): larger pages mean fewer WAL
    # frames per commit for the random-key (messageId) index inserts that dominate ingest.
    cur.execute(f"PRAGMA page_size={_SQLITE_PAGE_SIZE}")
    # WAL lets readers (connectors, features) run while ingest writes; NORMAL is crash-safe in WAL.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    # 128 MiB page cache. Ingest commits in large groups, and pages the cache lacks come from the
    # OS cache: 512 MiB measured no faster at 1M events, and cost ~320 MB more peak RSS.
    cur.execute("PRAGMA cache_size=-131072")
    # About 256 MiB of WAL between checkpoints: fewer, larger checkpoints during ingest.
    cur.execute(f"PRAGMA wal_autocheckpoint={(256 << 20) // _SQLITE_PAGE_SIZE}")
    # temp_store stays FILE (the default): the per-batch SAVEPOINT journals are written through
    # the OS cache, which is much cheaper to release than SQLite's in-memory journal chunks.
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    """Emit BEGIN ourselves (pysqlite's is disabled): ``BEGIN IMMEDIATE`` for :meth:`Store.writer`
    connections, so a write session that reads first never fails upgrading its lock."""
    conn.exec_driver_sql(conn.get_execution_options().get("cdp_sqlite_begin", "BEGIN"))


def _sqlite_file(url: str) -> bool:
    """A SQLite URL naming a file (not ``:memory:`` nor a shared in-memory URI)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return False  # create_engine reports it
    database = parsed.database or ""
    return (
        parsed.get_backend_name() == "sqlite"
        and database not in ("", ":memory:")
        and parsed.query.get("mode") != "memory"
        and "mode=memory" not in database
    )


def make_engine(url: str) -> Engine:
    url = normalize_db_url(url)
    # orjson: JSON columns (event properties, traits) are on the ingest hot path.
    kwargs: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
    if url.startswith("postgresql"):
        kwargs["pool_pre_ping"] = True
    elif url.startswith("sqlite") and _sqlite_file(url):
        # Keep connections open: a new SQLite connection costs a file open and _sqlite_pragmas
        # (~0.2 ms), which the coordinator paid on most of its many small transactions once more
        # threads than the default 5 pooled connections were busy (overflow connections are
        # closed when returned). Idle connections hold only their page cache's used pages.
        kwargs["pool_size"] = _SQLITE_POOL_SIZE
        kwargs["max_overflow"] = _SQLITE_POOL_OVERFLOW
    try:
        engine = create_engine(url, **kwargs)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StoreError(
            f"cannot use database URL: {exc}",
            field="db",
            value=redact_url(url),
            fix="pass a SQLAlchemy URL such as sqlite:///path/cdp.sqlite or "
            "postgresql+psycopg://user@host/db",
        ) from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


class EncodedRows:
    """Rows for :meth:`Store.bulk_insert`, encoded by :meth:`Store.encode_rows` for that store."""

    __slots__ = ("store", "columns", "json", "other", "rows")

    def __init__(
        self,
        store: Store,
        columns: tuple[str, ...],
        json: list[str],
        other: list[tuple[Any, ...]],
        rows: list[tuple[Any, ...]],
    ) -> None:
        self.store = store
        self.columns = columns
        self.json = json  # JSON arrays of rows (SQLite)
        self.other = other  # rows to bind as parameters
        self.rows = rows  # all of them, as given

    def __len__(self) -> int:
        return len(self.rows)


class Store:
    """One participant's database. Use :func:`open_store` to get one."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=False)
        self._max_params: int | None = None
        self._json: bool | None = None
        self._sql_cache: dict[tuple[Any, ...], str] = {}
        self._tcf_vendor_ids: tuple[int, ...] | None = None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def display_url(self) -> str:
        return redact_url(self.url)

    def store_error(self, exc: BaseException) -> StoreError | None:
        """The :class:`StoreError` for a driver error that means the store is unusable (connection
        lost, database locked or full...), or None for errors a caller may recover from (such as a
        constraint violation raised by one plugin's bad row)."""
        if isinstance(exc, OperationalError) or (
            isinstance(exc, DBAPIError) and exc.connection_invalidated
        ):
            return StoreError(
                f"database error: {exc.orig}",
                field="db",
                value=self.display_url,
                fix="check that the database is running and reachable; the batch was rolled back",
            )
        return None

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction: committed whole on success, rolled back whole on any error."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except DBAPIError as exc:
            error = self.store_error(exc)
            if error is not None:
                raise error from exc
            raise

    @contextmanager
    def writer(self) -> Iterator[Connection]:
        """A connection for a long write session that commits when the caller says so
        (``conn.commit()``); whatever is uncommitted on exit is rolled back. On SQLite each of its
        transactions takes the write lock up front (``BEGIN IMMEDIATE``)."""
        try:
            with self.engine.connect() as conn:  # closing it rolls back what is uncommitted
                conn.execution_options(cdp_sqlite_begin="BEGIN IMMEDIATE")
                yield conn
        except DBAPIError as exc:
            error = self.store_error(exc)
            if error is not None:
                raise error from exc
            raise

    def schema_version(self) -> int | None:
        try:
            names = set(inspect(self.engine).get_table_names())
        except OperationalError as exc:
            raise StoreError(
                f"cannot connect to database: {exc.orig}",
                field="db",
                value=self.display_url,
                fix="start the database or correct --db / CDP_FL_DB",
            ) from exc
        if schema.meta.name not in names:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")
            ).first()
        return int(row[0]) if row else None

    def get_meta(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(schema.meta.c.value).where(schema.meta.c.key == key)).first()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.begin() as conn:
            conn.execute(schema.meta.delete().where(schema.meta.c.key == key))
            conn.execute(schema.meta.insert(), [{"key": key, "value": value}])
        if key == TCF_VENDORS_META:
            self._tcf_vendor_ids = None

    @property
    def tcf_vendor_ids(self) -> tuple[int, ...]:
        """IAB vendor ids whose TCF consent this ledger records at ingest: the store's own
        configuration (``cdp-fl db init --tcf-vendors``), else the ``tcf_vendor_ids`` setting.
        Read once and cached, so ingest never queries for it per batch."""
        if self._tcf_vendor_ids is None:
            from ..settings import get_setting, parse_int_list

            text = self.get_meta(TCF_VENDORS_META)
            if text is None:
                text = str(get_setting("tcf_vendor_ids") or "")
            self._tcf_vendor_ids = parse_int_list(text, field="tcf_vendor_ids")
        return self._tcf_vendor_ids

    def insert_ignore(
        self, conn: Connection, table: Any, rows: Sequence[dict[str, Any]], keys: Sequence[str]
    ) -> None:
        """Insert rows, silently skipping those whose ``keys`` already exist (both dialects)."""
        if not rows:
            return
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:  # generic fallback: caller already de-duplicated against the table
            conn.execute(table.insert(), list(rows))
            return
        conn.execute(insert(table).on_conflict_do_nothing(index_elements=list(keys)), list(rows))

    def ts_param(self, value: datetime | None) -> Any:
        """A UTC datetime as the driver expects it in :meth:`bulk_insert` (SQLite stores text in
        SQLAlchemy's own format, ``YYYY-MM-DD HH:MM:SS.ffffff`` without offset, so ORM reads and
        SQL comparisons agree)."""
        if value is None or self.dialect != "sqlite":
            return value
        return _sqlite_ts(value)

    def iso_ts_converter(self) -> Callable[[Any], Any] | None:
        """For the ingest hot path: a function giving :meth:`ts_param` of
        ``datetime.fromisoformat(text)`` straight from ``text`` (a timestamp already known to
        parse), or None when the text is of another form; None when this store has no such
        shortcut."""
        return _sqlite_ts_from_iso if self.dialect == "sqlite" else None

    def ts_converter(self) -> Callable[[datetime], Any]:
        """:meth:`ts_param` as a plain function of a (non-None) datetime, for hot loops."""
        if self.dialect != "sqlite":
            return _identity
        return _sqlite_ts

    def max_params(self, conn: Connection) -> int:
        """Bound parameters one statement may carry on this database."""
        if self._max_params is None:
            limit = 65535 if self.dialect == "postgresql" else 999
            if self.dialect == "sqlite":
                try:
                    raw = conn.connection.driver_connection
                    limit = raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)  # type: ignore[union-attr]
                except (AttributeError, sqlite3.Error):
                    limit = 999  # SQLite's historical minimum
            self._max_params = max(1, min(limit, _MAX_PARAMS))
        return self._max_params

    def _cached_sql(self, build: Callable[..., str], *args: Any) -> str:
        """``build(*args)``, cached: a multi-row statement is long and cheap to reuse."""
        key = (build, *args[1:])  # args[0] is the connection (same dialect every time)
        sql = self._sql_cache.get(key)
        if sql is None:
            if len(self._sql_cache) > 64:
                self._sql_cache.clear()
            sql = self._sql_cache[key] = build(*args)
        return sql

    def _json_ok(self, conn: Connection) -> bool:
        """SQLite with its JSON functions (built in since 3.38; optional before)."""
        if self._json is None:
            try:
                conn.exec_driver_sql("SELECT json_extract('[1]', '$[0]')").all()
                self._json = True
            except DBAPIError:
                self._json = False
        return self._json

    def encode_rows(self, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> EncodedRows:
        """Rows made ready for :meth:`bulk_insert` ahead of the transaction, in any thread and
        without a connection (see :meth:`bulk_insert`). Never raises for the values themselves:
        a row that cannot be encoded is kept as is and fails, if at all, when inserted."""
        columns = tuple(columns)
        if self.dialect != "sqlite":
            return EncodedRows(self, columns, [], rows, rows)
        width = len(columns)
        safe = _JSON_SAFE.issuperset
        plain: list[tuple[Any, ...]] = []
        other: list[tuple[Any, ...]] = []
        for row in rows:
            (plain if len(row) == width and safe(map(type, row)) else other).append(row)
        texts: list[str] = []
        for start in range(0, len(plain), _JSON_CHUNK):
            part = plain[start : start + _JSON_CHUNK]
            try:
                texts.append(orjson.dumps(part).decode())
            except (TypeError, orjson.JSONEncodeError):  # e.g. an int beyond 64 bits
                other.extend(part)
        return EncodedRows(self, columns, texts, other, rows)

    def bulk_insert(
        self,
        conn: Connection,
        table: Any,
        columns: Sequence[str],
        rows: list[tuple[Any, ...]] | EncodedRows,
        *,
        on_conflict: str = "",
        same: Mapping[str, Any] | None = None,
    ) -> None:
        """Hot-path insert of positional tuples (or of :meth:`encode_rows`' result).

        The database should do the work in as few calls as possible, because it works without
        the GIL while parsing goes on in another thread, whereas binding parameters holds the GIL:

        * SQLite: the rows go in as one JSON text per statement, expanded by ``json_each`` in C
          (``INSERT ... SELECT json_extract(value, '$[0]'), ... FROM json_each(?1)``). Rows
          holding anything but str, int, bool or None (e.g. a float, whose text form SQLite
          builds before 3.43 may round differently) use the statement below instead.
        * SQLite rows that cannot go as JSON (or a SQLite without JSON functions): multi-row
          ``INSERT ... VALUES (...), (...)`` statements, as few as the parameter limit allows
          (rather than an executemany, which steps, and takes the GIL back, once per row).
        * Other databases: an executemany of a single-row statement, which their drivers
          pipeline (psycopg).

        Values must already be driver-ready: timestamps via :meth:`ts_param`, JSON as text.
        ``same`` gives columns whose value is the same in every row (bound once; not in
        ``rows``). ``on_conflict`` is an ``ON CONFLICT ...`` clause (same syntax in SQLite and
        PostgreSQL; with ``DO UPDATE`` the rows' conflict keys must be distinct).
        """
        if not rows:
            return
        columns = tuple(columns)
        extra_cols = tuple(same) if same else ()
        extra = tuple(same.values()) if same else ()
        rest: list[tuple[Any, ...]]
        if self.dialect == "sqlite" and self._json_ok(conn):
            encoded = rows
            if not (
                isinstance(encoded, EncodedRows)
                and encoded.store is self
                and encoded.columns == columns
            ):
                encoded = self.encode_rows(columns, list(rows))
            if encoded.json:
                sql = self._cached_sql(
                    self._json_insert_sql, conn, table, columns, extra_cols, on_conflict
                )
                for text in encoded.json:
                    conn.exec_driver_sql(sql, (text, *extra))
            rest = encoded.other
        else:
            rest = rows.rows if isinstance(rows, EncodedRows) else rows
        if not rest:
            return
        if extra:
            rest = [row + extra for row in rest]
        columns += extra_cols
        if self.dialect != "sqlite":
            # A client/server driver pipelines executemany (psycopg), and waits for the network
            # without the GIL: one single-row statement, prepared once, is its fastest form.
            sql = self._cached_sql(self._values_insert_sql, conn, table, columns, 1, on_conflict)
            conn.exec_driver_sql(sql, rest)
            return
        per = max(1, self.max_params(conn) // len(columns))
        for start in range(0, len(rest), per):
            part = rest[start : start + per]
            sql = self._cached_sql(
                self._values_insert_sql, conn, table, columns, len(part), on_conflict
            )
            conn.exec_driver_sql(sql, tuple(chain.from_iterable(part)))

    @staticmethod
    def _values_insert_sql(
        conn: Connection, table: Any, columns: Sequence[str], n: int, on_conflict: str
    ) -> str:
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        quote = conn.dialect.identifier_preparer.quote
        row = f"({', '.join([mark] * len(columns))})"
        return (
            f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) "
            f"VALUES {', '.join([row] * n)} {on_conflict}"
        )

    @staticmethod
    def _json_insert_sql(
        conn: Connection,
        table: Any,
        columns: Sequence[str],
        extra_cols: Sequence[str],
        on_conflict: str,
    ) -> str:
        quote = conn.dialect.identifier_preparer.quote
        values = [f"json_extract(value, '$[{i}]')" for i in range(len(columns))]
        values += [f"?{i + 2}" for i in range(len(extra_cols))]
        names = ", ".join(quote(c) for c in (*columns, *extra_cols))
        # "WHERE true" keeps SQLite from reading ON CONFLICT as a join constraint.
        return (
            f"INSERT INTO {quote(table.name)} ({names}) "
            f"SELECT {', '.join(values)} FROM json_each(?1) WHERE true {on_conflict}"
        )

    def existing_keys(
        self, conn: Connection, table: Any, column: str, keys: Sequence[Any]
    ) -> set[Any]:
        """Which of ``keys`` are already in ``table.column`` (seen through ``conn``, so rows it
        wrote in its open transaction count)."""
        found: set[Any] = set()
        if not keys:
            return found
        quote = conn.dialect.identifier_preparer.quote
        col, name = quote(column), quote(table.name)
        if self.dialect == "sqlite" and self._json_ok(conn) and all(type(k) is str for k in keys):
            sql = f"SELECT {col} FROM {name} WHERE {col} IN (SELECT value FROM json_each(?))"
            found.update(
                row[0] for row in conn.exec_driver_sql(sql, (orjson.dumps(list(keys)).decode(),))
            )
            return found
        if self.dialect == "postgresql" and all(type(k) is str for k in keys):
            sql = f"SELECT {col} FROM {name} WHERE {col} = ANY(%s)"
            found.update(row[0] for row in conn.exec_driver_sql(sql, (list(keys),)))
            return found
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        per = self.max_params(conn)
        for start in range(0, len(keys), per):
            part = tuple(keys[start : start + per])
            sql = f"SELECT {col} FROM {name} WHERE {col} IN ({', '.join([mark] * len(part))})"
            found.update(row[0] for row in conn.exec_driver_sql(sql, part))
        return found

    def checkpoint(self) -> None:
        """After a bulk write (SQLite): copy the WAL into the database file, without waiting for
        readers, so that later readers (features, connectors) need not look pages up in a large
        WAL. Best effort: committed data is durable either way. No-op on other databases."""
        if self.dialect != "sqlite":
            return
        try:
            raw = self.engine.raw_connection()  # outside any transaction, as a checkpoint must be
            try:
                raw.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # type: ignore[union-attr]
            finally:
                raw.close()
        except (DBAPIError, sqlite3.Error):
            pass

    def dispose(self) -> None:
        self.engine.dispose()


def create_schema(store: Store) -> int:
    """Create (or confirm) the schema; returns the version. Refuses a database of another version."""
    version = store.schema_version()
    if version is not None and version != SCHEMA_VERSION:
        raise SchemaVersionError(
            "database schema version is not supported by this release",
            field="schema_version",
            value=version,
            fix=f"use a database created by a release with schema version {SCHEMA_VERSION}",
        )
    with store.begin() as conn:
        metadata.create_all(conn)
        if version is None:
            conn.execute(
                schema.meta.insert(), [{"key": "schema_version", "value": str(SCHEMA_VERSION)}]
            )
    return SCHEMA_VERSION


def open_store(url: str, *, create: bool = False) -> Store:
    """Open a store. With ``create=True`` the schema is created when absent; otherwise a database
    without the schema is an error telling the user to run ``cdp-fl db init``."""
    store = Store(make_engine(url))
    version = store.schema_version()
    if version is None:
        if not create:
            raise SchemaVersionError(
                "database has no cdp-federated schema",
                field="db",
                value=store.display_url,
                fix=f"run: cdp-fl db init --db {store.display_url}",
            )
        create_schema(store)
    elif version != SCHEMA_VERSION:
        raise SchemaVersionError(
            "database schema version is not supported by this release",
            field="schema_version",
            value=version,
            fix=f"use a database created by a release with schema version {SCHEMA_VERSION}",
        )
    return store
