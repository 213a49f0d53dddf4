"""SQL connector (``type: sql``): any SQLAlchemy URL (a bare path means SQLite), reading a ``table``
(``options.schema`` picks a database schema) or a ``query`` (a SELECT, used as a subquery).

Unlike the file connectors, :meth:`SqlConnector.scan` pushes the work into the database: only the
contract's columns are selected, and when the consent ledger lives in the same database the allowed
ids arrive as ``WHERE id IN (<ledger query>)``, a semi-join the database plans itself. With the
ledger elsewhere the ids are semi-joined in polars. Plugins' predicates are polars expressions and
are applied after reading. The rows are read when ``scan()`` is called.

Column types come from reflection (tables) and, where a type is unknown (a query, an untyped SQLite
column), from a sample of ``options.infer_schema_rows`` rows (default 100), so the chosen feature
columns never depend on which rows consent lets through.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    NoSuchModuleError,
    NoSuchTableError,
    SQLAlchemyError,
)

from cdp_federated.connector import (
    Connector,
    ConnectorConfig,
    ScanRequest,
    apply_request,
    conform,
)
from cdp_federated.errors import (
    ColumnTypeError,
    ConfigError,
    ConnectorError,
    MissingColumnError,
    SourceUnavailableError,
)
from cdp_federated.hookspecs import hookimpl
from cdp_federated.settings import normalize_db_url
from cdp_federated.store import redact_url

__all__ = ["SqlConnector", "same_database", "cdp_register_connectors"]

_OPTIONS = frozenset({"schema", "infer_schema_rows"})


def _polars_type(sql_type: Any) -> pl.DataType:
    """The polars type a reflected column will read as; ``Null`` when unknown (decided by sample)."""
    if isinstance(sql_type, sa.Boolean):
        return pl.Boolean()
    if isinstance(sql_type, sa.Integer):
        return pl.Int64()
    if isinstance(sql_type, sa.Numeric):  # Float is a Numeric too
        return pl.Float64()
    if isinstance(sql_type, sa.String):
        return pl.String()
    if isinstance(sql_type, sa.DateTime):
        return pl.Datetime()
    if isinstance(sql_type, sa.Date):
        return pl.Date()
    return pl.Null()


def _is_numeric(dtype: pl.DataType) -> bool:
    return dtype.is_numeric() or dtype == pl.Boolean


def _database_key(url: str) -> tuple[Any, ...] | None:
    try:
        parsed = make_url(normalize_db_url(url))
    except ArgumentError:
        return None
    database = parsed.database
    if parsed.get_backend_name() == "sqlite":
        if not database or database == ":memory:" or database.startswith("file:"):
            return None  # two in-memory engines never share data
        database = str(Path(database).expanduser().resolve())
    # The driver (psycopg vs psycopg2) and password do not change which database it is.
    return (parsed.get_backend_name(), parsed.username, parsed.host, parsed.port, database)


def same_database(a: str | None, b: str | None) -> bool:
    """Whether two URLs (or bare SQLite paths) name the same database, so SQL can join across."""
    if not a or not b:
        return False
    key = _database_key(a)
    return key is not None and key == _database_key(b)


class SqlConnector(Connector):
    type_name: ClassVar[str] = "sql"
    required: ClassVar[tuple[str, ...]] = ("url",)

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        unknown = sorted(set(config.options) - _OPTIONS)
        if unknown:
            raise ConfigError(
                "unknown sql connector option",
                field=f"{config.name}.options.{unknown[0]}",
                value=unknown,
                fix=f"use only {', '.join(sorted(_OPTIONS))}",
            )
        if not (config.table or config.query):
            raise ConfigError(
                "connector type 'sql' needs a table or a query",
                field=f"{config.name}.table",
                value=None,
                fix="add 'table: <name>' or 'query: SELECT ...' to the source declaration",
            )
        rows = config.options.get("infer_schema_rows", 100)
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ConfigError(
                "infer_schema_rows must be a positive whole number",
                field=f"{config.name}.options.infer_schema_rows",
                value=rows,
                fix="e.g. infer_schema_rows: 1000",
            )
        self._infer_rows = rows
        self.url = normalize_db_url(config.url)  # type: ignore[arg-type]  # required above
        self.display_url = redact_url(self.url)
        self.engine = self._make_engine()  # one per connector; close() disposes it
        # Callers that forget close() still release the pool when the connector is collected.
        weakref.finalize(self, self.engine.dispose)
        self._schema: dict[str, pl.DataType] | None = None
        self._from: sa.FromClause | None = None

    # --- engine and connections ------------------------------------------------------------------

    def _make_engine(self) -> sa.Engine:
        kwargs: dict[str, Any] = {}
        try:
            backend = make_url(self.url).get_backend_name()
            if backend == "postgresql":
                kwargs["connect_args"] = {"connect_timeout": 10}  # fail fast, do not hang a round
            elif backend == "sqlite":
                kwargs["connect_args"] = {"timeout": 30}  # wait for the ingest writer's lock
            return sa.create_engine(self.url, **kwargs)
        except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as exc:
            raise ConfigError(
                f"cannot use database URL: {exc}",
                field=f"{self.config.name}.url",
                value=self.display_url,
                fix="give a SQLAlchemy URL such as sqlite:///path/data.sqlite or "
                "postgresql+psycopg://user@host/db, and install its driver",
            ) from exc

    def close(self) -> None:
        """Release the connection pool (the connector can still reconnect if used again)."""
        self.engine.dispose()

    def __enter__(self) -> SqlConnector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _unavailable(self, reason: object) -> SourceUnavailableError:
        return SourceUnavailableError(
            f"cannot reach database of source {self.config.name!r}: {reason}",
            field=f"{self.config.name}.url",
            value=self.display_url,
            fix="check that the database is running and reachable and the URL is right",
        )

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        database = self.engine.url.database
        if (
            self.engine.dialect.name == "sqlite"
            and database
            and database != ":memory:"
            and not database.startswith("file:")
            and not Path(database).is_file()
        ):
            # sqlite3 would silently create an empty file; a reader must not.
            raise self._unavailable(f"no SQLite database file at {database}")
        try:
            conn = self.engine.connect()
        except SQLAlchemyError as exc:
            raise self._unavailable(getattr(exc, "orig", None) or exc) from exc
        with conn:
            yield conn

    def _read(self, conn: Connection, stmt: sa.Executable) -> pl.DataFrame:
        try:
            # infer over every row: a value far down a column must not break the read
            return pl.read_database(stmt, conn, infer_schema_length=None)
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise self._unavailable(exc.orig) from exc
            what = "query" if self.config.query else "table"
            raise ConnectorError(
                f"reading source {self.config.name!r} failed: {exc.orig}",
                field=f"{self.config.name}.{what}",
                value=self.config.query or self.config.table,
                fix=f"check the {what} runs in the database as written",
            ) from exc
        except pl.exceptions.PolarsError as exc:
            raise ColumnTypeError(
                f"source {self.config.name!r} has a column mixing types: {exc}",
                field=f"{self.config.name}.{'query' if self.config.query else 'table'}",
                value=self.config.query or self.config.table,
                fix="cast the column to one type in the table or the query",
            ) from exc

    # --- discovery -------------------------------------------------------------------------------

    def _reflect(self, conn: Connection) -> sa.Table:
        schema = self.config.options.get("schema")
        try:
            return sa.Table(self.config.table, sa.MetaData(), schema=schema, autoload_with=conn)
        except NoSuchTableError:
            inspector = sa.inspect(conn)
            names = sorted(inspector.get_table_names(schema) + inspector.get_view_names(schema))
            raise ConnectorError(
                f"table {self.config.table!r} not found in source {self.config.name!r}",
                field=f"{self.config.name}.table",
                value=self.config.table,
                fix="use one of the tables: " + (", ".join(names) or "(none)"),
            ) from None

    def _query_subquery(self, conn: Connection) -> sa.Subquery:
        query = self.config.query.strip().rstrip(";")  # type: ignore[union-attr]
        try:
            names = list(conn.execute(sa.text(f"SELECT * FROM ({query}) AS src LIMIT 0")).keys())
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise self._unavailable(exc.orig) from exc
            raise ConnectorError(
                f"query of source {self.config.name!r} failed: {exc.orig}",
                field=f"{self.config.name}.query",
                value=query,
                fix="give one SELECT statement that runs in the database as written",
            ) from exc
        return sa.text(query).columns(*(sa.column(n) for n in names)).subquery("src")

    def _discover(self) -> tuple[dict[str, pl.DataType], sa.FromClause]:
        if self._schema is None or self._from is None:
            with self._connect() as conn:
                if self.config.table:
                    source: sa.FromClause = self._reflect(conn)
                    schema = {c.name: _polars_type(c.type) for c in source.columns}
                else:
                    source = self._query_subquery(conn)
                    schema = {c.name: pl.Null() for c in source.columns}
                unknown = [name for name, dtype in schema.items() if dtype == pl.Null]
                if unknown:
                    sample = self._read(
                        conn, sa.select(*(source.c[n] for n in unknown)).limit(self._infer_rows)
                    )
                    schema.update({n: sample.schema[n] for n in unknown})
            self._schema, self._from = schema, source
        return self._schema, self._from

    def available_columns(self) -> dict[str, str]:
        schema, _ = self._discover()
        return {name: str(dtype) for name, dtype in schema.items()}

    def _features(self, schema: dict[str, pl.DataType]) -> list[str]:
        """Validate the declaration against the source before any row is read (as conform does)."""
        cfg = self.config
        wanted = [cfg.id_column] + [c for c in (cfg.label, cfg.jurisdiction_column) if c]
        if cfg.features is not None:
            features = list(cfg.features)
        else:
            features = [n for n, t in schema.items() if n not in wanted and _is_numeric(t)]
        for name in [*wanted, *features]:
            if name not in schema:
                raise MissingColumnError(
                    f"column {name!r} not found in source {cfg.name!r}",
                    field=name,
                    value=cfg.table or self.display_url,
                    fix=f"use one of the available columns: {', '.join(schema)}",
                )
        for name in features + ([cfg.label] if cfg.label else []):
            dtype = schema[name]
            if dtype != pl.Null and not _is_numeric(dtype):  # Null: unknown, checked after reading
                raise ColumnTypeError(
                    f"column {name!r} of source {cfg.name!r} is {dtype}, not numeric",
                    field=name,
                    value=str(dtype),
                    fix="encode it numerically upstream or leave it out of 'features'",
                )
        return features

    # --- reading ---------------------------------------------------------------------------------

    def _source(self) -> pl.LazyFrame:
        _, source = self._discover()
        with self._connect() as conn:
            return self._read(conn, sa.select(*source.columns)).lazy()

    def scan(self, request: ScanRequest | None = None) -> pl.LazyFrame:
        """Read the contract's columns, with consent pushed into SQL when the ledger is local."""
        cfg = self.config
        schema, source = self._discover()
        features = self._features(schema)
        # Ids compare as text, as the ledger stores them; cast only when the column is not text
        # (a cast would stop the database using an index on the column).
        id_expr: sa.ColumnElement[Any] = source.c[cfg.id_column]
        if schema[cfg.id_column] != pl.String:
            id_expr = sa.cast(id_expr, sa.String)
        columns = dict.fromkeys([*features, cfg.label, cfg.jurisdiction_column])
        stmt = sa.select(
            id_expr.label(cfg.id_column),
            *(source.c[n] for n in columns if n and n != cfg.id_column),
        )
        allowed = request.allowed_ids if request else None
        pushed = allowed is not None and same_database(allowed.database_url, self.url)
        if pushed:
            stmt = stmt.where(id_expr.in_(allowed.as_sql()))  # type: ignore[union-attr]
        with self._connect() as conn:
            frame = self._read(conn, stmt)
        # All-null or empty columns read as Null: give them the contract's type.
        text_columns = {cfg.id_column, cfg.jurisdiction_column}
        frame = frame.with_columns(
            pl.col(n).cast(pl.String if n in text_columns else pl.Float64)
            for n, dtype in frame.schema.items()
            if dtype == pl.Null
        )
        lazy = conform(frame.lazy(), cfg.model_copy(update={"features": tuple(features)}))
        if pushed:
            request = ScanRequest(predicates=request.predicates)  # type: ignore[union-attr]
        return apply_request(lazy, request)


@hookimpl
def cdp_register_connectors() -> list[type[Connector]]:
    return [SqlConnector]
