"""Local store: engine creation, explicit versioned schema creation, and dialect helpers.

SQLite (a file under the data dir) is the default; any SQLAlchemy URL works, PostgreSQL is tested.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, create_engine, event, inspect, select
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from ..errors import SchemaVersionError, StoreError
from ..settings import normalize_db_url
from . import schema
from .schema import SCHEMA_VERSION, metadata

__all__ = [
    "Store",
    "open_store",
    "create_schema",
    "schema",
    "SCHEMA_VERSION",
    "redact_url",
]


def redact_url(url: str) -> str:
    """The URL with any password masked, safe to print and to put in results."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - printing must never fail
        return url


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers (connectors, features) run while ingest writes; NORMAL is crash-safe in WAL.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA cache_size=-131072")  # 128 MiB page cache: index inserts stay in memory
    cur.execute("PRAGMA wal_autocheckpoint=16384")  # fewer, larger checkpoints during ingest
    cur.close()


def _make_engine(url: str) -> Engine:
    url = normalize_db_url(url)
    # orjson: JSON columns (event properties, traits) are on the ingest hot path.
    kwargs: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
    if url.startswith("postgresql"):
        kwargs["pool_pre_ping"] = True
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
    return engine


class Store:
    """One participant's database. Use :func:`open_store` to get one."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def display_url(self) -> str:
        return redact_url(self.url)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction: committed whole on success, rolled back whole on any error."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except (OperationalError, DBAPIError) as exc:
            if getattr(exc, "connection_invalidated", False) or isinstance(exc, OperationalError):
                raise StoreError(
                    f"database error: {exc.orig}",
                    field="db",
                    value=self.display_url,
                    fix="check that the database is running and reachable; the batch was rolled back",
                ) from exc
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
        SQLAlchemy's own format, so ORM reads and SQL comparisons agree)."""
        if value is None or self.dialect != "sqlite":
            return value
        return value.replace(tzinfo=None).isoformat(" ", "microseconds")

    def bulk_insert(
        self,
        conn: Connection,
        table: Any,
        columns: Sequence[str],
        rows: list[tuple[Any, ...]],
        *,
        on_conflict: str = "",
    ) -> None:
        """Hot-path insert of positional tuples straight through the driver's executemany.

        Values must already be driver-ready: timestamps via :meth:`ts_param`, JSON as text.
        ``on_conflict`` is an ``ON CONFLICT ...`` clause (same syntax in SQLite and PostgreSQL).
        """
        if not rows:
            return
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        quote = conn.dialect.identifier_preparer.quote
        sql = (
            f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) "
            f"VALUES ({', '.join([mark] * len(columns))}) {on_conflict}"
        )
        conn.exec_driver_sql(sql, rows)

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
    store = Store(_make_engine(url))
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
