"""SQL connector on SQLite and PostgreSQL: schema contract, query sources, consent pushdown, errors."""

from __future__ import annotations

import socket

import polars as pl
import pytest
import sqlalchemy as sa

from cdp_federated.connector import ConnectorRegistry, ScanRequest
from cdp_federated.errors import (
    ColumnTypeError,
    ConfigError,
    ConnectorError,
    MissingColumnError,
    SourceUnavailableError,
)
from connectors.sql import same_database

COLUMNS = ("customer_id", "spend", "visits", "churned", "country", "tier")
CUSTOMERS = [
    dict(zip(COLUMNS, row, strict=True))
    for row in [
        ("c1", 10.5, 3, True, "DE", "gold"),
        ("c2", None, 1, False, "US-CA", "silver"),
        (None, 4.0, 2, False, "FR", "gold"),
        ("c4", 7.0, 0, True, None, "gold"),
        ("c5", 1.0, 5, False, "DE", "bronze"),
    ]
]
ALLOWED = [
    {"profile_id": "c1", "ok": True},
    {"profile_id": "c2", "ok": False},
    {"profile_id": "c4", "ok": True},
    {"profile_id": "zz", "ok": True},
]


def make_tables(url):
    """customers (a source table) and allowed (standing in for the consent ledger)."""
    meta = sa.MetaData()
    customers = sa.Table(
        "customers",
        meta,
        sa.Column("customer_id", sa.String(20)),
        sa.Column("spend", sa.Float),
        sa.Column("visits", sa.Integer),
        sa.Column("churned", sa.Boolean),
        sa.Column("country", sa.String(10)),
        sa.Column("tier", sa.String(10)),
    )
    allowed = sa.Table(
        "allowed", meta, sa.Column("profile_id", sa.String(20)), sa.Column("ok", sa.Boolean)
    )
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        meta.create_all(conn)
        conn.execute(customers.insert(), CUSTOMERS)
        conn.execute(allowed.insert(), ALLOWED)
    engine.dispose()
    return customers, allowed


class TableAllowedIds:
    """A tiny AllowedIds: ids with ``ok`` true in the ``allowed`` table of ``read_url``."""

    def __init__(self, table, read_url, database_url):
        self.table = table
        self.read_url = read_url
        self.database_url = database_url
        self.frame_calls = 0

    def as_sql(self):
        return sa.select(self.table.c.profile_id).where(self.table.c.ok == sa.true())

    def as_frame(self):
        self.frame_calls += 1
        engine = sa.create_engine(self.read_url)
        with engine.connect() as conn:
            ids = [row[0] for row in conn.execute(self.as_sql())]
        engine.dispose()
        return pl.LazyFrame({"profile_id": ids}, schema={"profile_id": pl.String})


@pytest.fixture
def opened():
    """Open connectors through the registry and close them (disposing engines) afterwards."""
    conns = []

    def open_(pm, **decl):
        conn = ConnectorRegistry(pm).open({"type": "sql", "name": "src", **decl})
        conns.append(conn)
        return conn

    yield open_
    for conn in conns:
        conn.close()


def capture(conn):
    statements: list[str] = []
    sa.event.listen(conn.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    return statements


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_table_schema_contract(pm, db_url, opened):
    make_tables(db_url)
    conn = opened(
        pm,
        url=db_url,
        table="customers",
        id_column="customer_id",
        label="churned",
        jurisdiction_column="country",
    )
    frame = conn.scan().collect().sort("profile_id")
    # features default to the numeric columns but id and label; the text column "tier" is left out
    assert frame.schema == pl.Schema(
        {
            "profile_id": pl.String,
            "spend": pl.Float64,
            "visits": pl.Float64,
            "churned": pl.Float64,
            "jurisdiction": pl.String,
        }
    )
    assert frame["profile_id"].to_list() == ["c1", "c2", "c4", "c5"]  # null id dropped
    assert frame["spend"].to_list() == [10.5, None, 7.0, 1.0]
    assert frame["churned"].to_list() == [1.0, 0.0, 1.0, 0.0]
    assert frame["jurisdiction"].to_list() == ["DE", "US-CA", None, "DE"]
    assert list(conn.available_columns()) == list(COLUMNS)


def test_only_the_contract_columns_are_selected(pm, db_url, opened):
    make_tables(db_url)
    conn = opened(pm, url=db_url, table="customers", id_column="customer_id", features=["visits"])
    conn.available_columns()  # discovery first, so the statement captured next is the read
    statements = capture(conn)
    assert conn.scan().collect().columns == ["profile_id", "visits"]
    (read,) = statements
    assert "visits" in read and "spend" not in read and "tier" not in read


def test_query_source_with_join_and_percent(pm, db_url, opened):
    make_tables(db_url)
    query = """
        SELECT c.customer_id AS profile_id, c.visits * 2 AS double_visits, c.spend, c.tier,
               CASE WHEN a.ok THEN 1 ELSE 0 END AS consented
        FROM customers c LEFT JOIN allowed a ON a.profile_id = c.customer_id
        WHERE c.tier LIKE 'g%' OR c.tier LIKE '%r';
    """
    conn = opened(pm, url=db_url, query=query, label="consented")
    frame = conn.scan().collect().sort("profile_id")
    assert frame.columns == ["profile_id", "double_visits", "spend", "consented"]
    assert frame["profile_id"].to_list() == ["c1", "c2", "c4"]
    assert frame["double_visits"].to_list() == [6.0, 2.0, 0.0]
    assert frame["consented"].to_list() == [1.0, 0.0, 1.0]
    with pytest.raises(ColumnTypeError) as info:
        opened(pm, url=db_url, query=query, features=["tier"]).scan()
    assert info.value.field == "tier"


def test_missing_column_lists_available_columns(pm, db_url, opened):
    make_tables(db_url)
    conn = opened(pm, url=db_url, table="customers", id_column="customer_id", features=["age"])
    with pytest.raises(MissingColumnError) as info:
        conn.scan()
    assert info.value.field == "age"
    assert "customer_id, spend, visits, churned, country, tier" in str(info.value)


def test_text_feature_is_a_column_type_error(pm, db_url, opened):
    make_tables(db_url)
    conn = opened(pm, url=db_url, table="customers", id_column="customer_id", features=["tier"])
    with pytest.raises(ColumnTypeError) as info:
        conn.scan()
    assert info.value.field == "tier" and "String" in str(info.value)


def test_unknown_table_lists_tables(pm, db_url, opened):
    make_tables(db_url)
    with pytest.raises(ConnectorError) as info:
        opened(pm, url=db_url, table="custmers").scan()
    assert info.value.field == "src.table" and "allowed, customers" in str(info.value)


def test_broken_query_names_the_query(pm, db_url, opened):
    make_tables(db_url)
    with pytest.raises(ConnectorError) as info:
        opened(pm, url=db_url, query="SELECT nope FROM customers").scan()
    assert info.value.field == "src.query" and not isinstance(info.value, SourceUnavailableError)


def test_consent_pushed_down_as_in_subquery(pm, db_url, opened):
    _, allowed = make_tables(db_url)
    conn = opened(pm, url=db_url, table="customers", id_column="customer_id")
    ids = TableAllowedIds(allowed, db_url, database_url=db_url)
    statements = capture(conn)
    request = ScanRequest(allowed_ids=ids, predicates=(pl.col("visits") < 3,))
    frame = conn.scan(request).collect()
    assert frame["profile_id"].to_list() == ["c4"]  # c1 is allowed but has 3 visits
    assert ids.frame_calls == 0  # the database did the semi-join
    reads = [s for s in statements if "customers" in s and "allowed" in s]
    assert len(reads) == 1
    assert " IN (SELECT allowed.profile_id" in " ".join(reads[0].split())


def test_other_database_falls_back_to_polars_semi_join(pm, db_url, opened, tmp_path):
    _, allowed = make_tables(db_url)
    conn = opened(pm, url=db_url, table="customers", id_column="customer_id")
    pushed = conn.scan(ScanRequest(allowed_ids=TableAllowedIds(allowed, db_url, db_url)))
    elsewhere = TableAllowedIds(allowed, db_url, database_url=str(tmp_path / "ledger.sqlite"))
    statements = capture(conn)
    fallback = conn.scan(ScanRequest(allowed_ids=elsewhere)).collect()
    assert elsewhere.frame_calls == 1
    assert not any("allowed" in s for s in statements)
    assert fallback.sort("profile_id").equals(pushed.collect().sort("profile_id"))
    assert sorted(fallback["profile_id"]) == ["c1", "c4"]


def test_integer_ids_compare_as_text_in_pushdown(pm, db_url, opened):
    engine = sa.create_engine(db_url)
    meta = sa.MetaData()
    orders = sa.Table("orders", meta, sa.Column("cid", sa.Integer), sa.Column("n", sa.Integer))
    allowed = sa.Table(
        "allowed", meta, sa.Column("profile_id", sa.String), sa.Column("ok", sa.Boolean)
    )
    with engine.begin() as c:
        meta.create_all(c)
        c.execute(orders.insert(), [{"cid": 7, "n": 1}, {"cid": 8, "n": 2}])
        c.execute(allowed.insert(), [{"profile_id": "8", "ok": True}])
    engine.dispose()
    conn = opened(pm, url=db_url, table="orders", id_column="cid")
    frame = conn.scan(ScanRequest(allowed_ids=TableAllowedIds(allowed, db_url, db_url))).collect()
    assert frame.to_dict(as_series=False) == {"profile_id": ["8"], "n": [2.0]}


def test_nothing_allowed_still_yields_the_contract_schema(pm, db_url, opened):
    _, allowed = make_tables(db_url)
    engine = sa.create_engine(db_url)
    with engine.begin() as c:
        c.execute(allowed.update().values(ok=False))
    engine.dispose()
    conn = opened(pm, url=db_url, table="customers", id_column="customer_id", label="churned")
    frame = conn.scan(ScanRequest(allowed_ids=TableAllowedIds(allowed, db_url, db_url))).collect()
    assert frame.height == 0
    assert frame.schema == pl.Schema(
        {"profile_id": pl.String, "spend": pl.Float64, "visits": pl.Float64, "churned": pl.Float64}
    )


def test_bare_path_means_sqlite(pm, tmp_path, opened):
    path = tmp_path / "plain.sqlite"
    make_tables(f"sqlite:///{path}")
    conn = opened(pm, url=str(path), table="customers", id_column="customer_id")
    assert conn.scan().collect().height == 4
    assert conn.engine.dialect.name == "sqlite"


def test_postgres_down_is_source_unavailable_with_redacted_url(pm, opened):
    url = f"postgresql+psycopg://cdp:s3cret@127.0.0.1:{closed_port()}/cdp"
    conn = opened(pm, url=url, table="customers")
    with pytest.raises(SourceUnavailableError) as info:
        conn.scan()
    message = str(info.value)
    assert "s3cret" not in message and "cdp:***@127.0.0.1" in message
    assert "Fix:" in message


def test_sqlite_in_missing_directory_is_source_unavailable(pm, tmp_path, opened):
    conn = opened(pm, url=f"sqlite:///{tmp_path}/no/such/dir/x.sqlite", table="customers")
    with pytest.raises(SourceUnavailableError):
        conn.available_columns()


def test_missing_sqlite_file_is_not_created(pm, tmp_path, opened):
    path = tmp_path / "absent.sqlite"
    with pytest.raises(SourceUnavailableError) as info:
        opened(pm, url=str(path), table="customers").scan()
    assert str(path) in str(info.value) and not path.exists()


def test_declaration_errors(pm, tmp_path):
    registry = ConnectorRegistry(pm)
    url = str(tmp_path / "x.sqlite")
    with pytest.raises(ConfigError) as info:
        registry.open({"type": "sql", "name": "s", "url": url})
    assert info.value.field == "s.table"
    with pytest.raises(ConfigError) as info:
        registry.open({"type": "sql", "name": "s", "url": url, "table": "t", "options": {"db": 1}})
    assert info.value.field == "s.options.db"
    with pytest.raises(ConfigError) as info:
        registry.open({"type": "sql", "name": "s", "url": "nosuchdb://x/y", "table": "t"})
    assert info.value.field == "s.url"
    with pytest.raises(ConfigError):
        registry.open({"type": "sql", "name": "s", "table": "t"})


def test_close_releases_pooled_connections(pm, tmp_path, opened):
    path = tmp_path / "pool.sqlite"
    make_tables(f"sqlite:///{path}")
    with opened(pm, url=str(path), table="customers", id_column="customer_id") as conn:
        conn.scan()
        assert conn.engine.pool.checkedin() == 1
    assert conn.engine.pool.checkedin() == 0


def test_same_database():
    assert same_database("/tmp/a/../x.sqlite", "sqlite:////tmp/x.sqlite")
    assert same_database(
        "postgresql+psycopg://u:one@db:5432/eu", "postgresql+psycopg2://u:two@db:5432/eu"
    )
    assert not same_database("postgresql://u@db/eu", "postgresql://u@db/us")
    assert not same_database("sqlite://", "sqlite://")  # two in-memory databases never match
    assert not same_database(None, "sqlite:////tmp/x.sqlite")
