"""CSV and Parquet connectors: schema contract, options, globs and unreadable sources."""

from __future__ import annotations

import polars as pl
import pytest

from cdp_federated.connector import ConnectorRegistry, ScanRequest
from cdp_federated.errors import (
    ColumnTypeError,
    ConfigError,
    ConnectorError,
    MissingColumnError,
    SourceUnavailableError,
)

CSV = """customer_id,spend,visits,churned,country,segment
007,10.5,3,1,DE,gold
008,,1,0,US-CA,silver
,4.0,2,0,FR,gold
009,7,0,1,,bronze
"""


def open_source(pm, **decl):
    return ConnectorRegistry(pm).open({"name": "src", **decl})


@pytest.fixture
def customers_csv(tmp_path):
    path = tmp_path / "customers.csv"
    path.write_text(CSV)
    return path


def test_csv_schema_contract(pm, customers_csv):
    conn = open_source(
        pm,
        type="csv",
        path=str(customers_csv),
        id_column="customer_id",
        label="churned",
        jurisdiction_column="country",
    )
    frame = conn.scan().collect()
    # features default to every numeric column but id and label; "segment" is text, left out
    assert frame.schema == pl.Schema(
        {
            "profile_id": pl.String,
            "spend": pl.Float64,
            "visits": pl.Float64,
            "churned": pl.Float64,
            "jurisdiction": pl.String,
        }
    )
    # ids keep their leading zeros (read as text) and the row with no id is dropped
    assert frame["profile_id"].to_list() == ["007", "008", "009"]
    assert frame["spend"].to_list() == [10.5, None, 7.0]
    assert frame["jurisdiction"].to_list() == ["DE", "US-CA", None]


def test_csv_declared_features_only(pm, customers_csv):
    frame = (
        open_source(
            pm, type="csv", path=str(customers_csv), id_column="customer_id", features=["visits"]
        )
        .scan()
        .collect()
    )
    assert frame.columns == ["profile_id", "visits"]


def test_csv_missing_column_lists_available_columns(pm, customers_csv):
    conn = open_source(
        pm, type="csv", path=str(customers_csv), id_column="customer_id", label="loyal"
    )
    with pytest.raises(MissingColumnError) as info:
        conn.scan()
    assert info.value.field == "loyal"
    assert "customer_id, spend, visits, churned, country, segment" in str(info.value)


def test_csv_text_feature_is_a_column_type_error(pm, customers_csv):
    conn = open_source(
        pm, type="csv", path=str(customers_csv), id_column="customer_id", features=["segment"]
    )
    with pytest.raises(ColumnTypeError) as info:
        conn.scan()
    assert info.value.field == "segment" and "String" in str(info.value)


def test_csv_options_separator_and_null_values(pm, tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("profile_id;score\na;1,5\nb;n/a\n")
    frame = (
        open_source(
            pm,
            type="csv",
            path=str(path),
            options={"separator": ";", "null_values": ["n/a"], "decimal_comma": True},
        )
        .scan()
        .collect()
    )
    assert frame.to_dict(as_series=False) == {"profile_id": ["a", "b"], "score": [1.5, None]}


def test_csv_unknown_option_is_named(pm, customers_csv):
    with pytest.raises(ConfigError) as info:
        open_source(pm, type="csv", path=str(customers_csv), options={"delimiter": ";"})
    assert info.value.field == "src.options.delimiter" and "separator" in str(info.value)


def test_csv_bad_option_value_is_a_config_error(pm, customers_csv):
    conn = open_source(pm, type="csv", path=str(customers_csv), options={"separator": ";;"})
    with pytest.raises(ConfigError) as info:
        conn.scan()
    assert info.value.field == "src.options"


def test_path_is_required(pm):
    with pytest.raises(ConfigError) as info:
        open_source(pm, type="csv")
    assert info.value.field == "src.path"


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_missing_file_is_source_unavailable(pm, tmp_path, kind):
    path = tmp_path / f"absent.{kind}"
    conn = open_source(pm, type=kind, path=str(path))
    with pytest.raises(SourceUnavailableError) as info:
        conn.scan()
    assert info.value.value == str(path) and "no such file" in str(info.value)


def test_directory_is_source_unavailable(pm, tmp_path):
    with pytest.raises(SourceUnavailableError) as info:
        open_source(pm, type="csv", path=str(tmp_path)).available_columns()
    assert "directory" in str(info.value)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_unreadable_file_is_source_unavailable(pm, tmp_path, monkeypatch, kind):
    # Tests run as root, where chmod does not stop reads: inject the error polars raises instead.
    path = tmp_path / f"locked.{kind}"
    if kind == "csv":
        path.write_text("profile_id,x\na,1\n")
    else:
        pl.DataFrame({"profile_id": ["a"], "x": [1]}).write_parquet(path)

    def denied(source, **_kwargs):
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(pl, f"scan_{kind}", denied)
    conn = open_source(pm, type=kind, path=str(path))
    with pytest.raises(SourceUnavailableError) as info:
        conn.scan()
    assert info.value.value == str(path) and "Permission denied" in str(info.value)
    assert isinstance(info.value, OSError)  # callers catching OSError still see it


def test_corrupt_parquet_is_a_connector_error(pm, tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ConnectorError) as info:
        open_source(pm, type="parquet", path=str(path)).scan()
    assert not isinstance(info.value, SourceUnavailableError) and str(path) in str(info.value)


def test_parquet_glob_reads_every_part(pm, tmp_path):
    parts = tmp_path / "export"
    parts.mkdir()
    pl.DataFrame({"cid": ["a", "b"], "x": [1, 2], "y": [True, False]}).write_parquet(
        parts / "part-0.parquet"
    )
    pl.DataFrame({"cid": ["c", None], "x": [3, 4], "y": [True, True]}).write_parquet(
        parts / "part-1.parquet"
    )
    (parts / "notes.txt").write_text("not matched by the glob")
    conn = open_source(pm, type="parquet", path=str(parts / "part-*.parquet"), id_column="cid")
    frame = conn.scan().collect().sort("profile_id")
    assert frame.to_dict(as_series=False) == {
        "profile_id": ["a", "b", "c"],
        "x": [1.0, 2.0, 3.0],
        "y": [1.0, 0.0, 1.0],
    }
    assert conn.available_columns() == {"cid": "String", "x": "Int64", "y": "Boolean"}


def test_csv_glob_reads_every_part(pm, tmp_path):
    (tmp_path / "a-1.csv").write_text("profile_id,x\np1,1\n")
    (tmp_path / "a-2.csv").write_text("profile_id,x\np2,2\n")
    conn = open_source(pm, type="csv", path=str(tmp_path / "a-*.csv"))
    assert sorted(conn.scan().collect()["profile_id"]) == ["p1", "p2"]


def test_parquet_glob_without_match_is_source_unavailable(pm, tmp_path):
    conn = open_source(pm, type="parquet", path=str(tmp_path / "none-*.parquet"))
    with pytest.raises(SourceUnavailableError) as info:
        conn.scan()
    assert "no file matches" in str(info.value)


def test_parquet_unknown_option(pm, tmp_path):
    with pytest.raises(ConfigError) as info:
        open_source(pm, type="parquet", path=str(tmp_path / "x.parquet"), options={"sep": ","})
    assert "hive_partitioning" in str(info.value)


def test_file_scan_applies_allowed_ids_and_predicates(pm, customers_csv):
    class Allowed:
        database_url = None

        def as_sql(self):  # pragma: no cover - files never push SQL down
            raise AssertionError("unexpected")

        def as_frame(self):
            return pl.LazyFrame({"profile_id": ["007", "009", "zzz"]})

    conn = open_source(pm, type="csv", path=str(customers_csv), id_column="customer_id")
    request = ScanRequest(allowed_ids=Allowed(), predicates=(pl.col("visits") > 0,))
    assert conn.scan(request).collect()["profile_id"].to_list() == ["007"]
