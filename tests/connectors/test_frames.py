"""In-memory frame connector: pandas and polars frames registered by name."""

from __future__ import annotations

import pandas as pd
import polars as pl
import pytest

from cdp_federated.connector import ConnectorRegistry, ScanRequest
from cdp_federated.errors import (
    ColumnTypeError,
    ConfigError,
    ConnectorError,
    MissingColumnError,
    UnknownConnectorError,
)
from connectors.frames import register_frame, registered_frames, unregister_frame


@pytest.fixture
def frames():
    """Names registered during a test are removed afterwards (the registry is process-wide)."""
    names: list[str] = []

    def add(name, frame):
        register_frame(name, frame)
        names.append(name)

    yield add
    for name in names:
        unregister_frame(name)


def open_frame(pm, name, **decl):
    return ConnectorRegistry(pm).open({"type": "frame", "name": "mem", "frame": name, **decl})


class FakeAllowed:
    """Allowed ids held in memory: a frame connector can only use the polars semi-join."""

    database_url = None

    def __init__(self, ids):
        self.ids = ids

    def as_sql(self):  # pragma: no cover - must never be called for an in-memory source
        raise AssertionError("a frame connector cannot push SQL down")

    def as_frame(self):
        return pl.LazyFrame({"profile_id": self.ids}, schema={"profile_id": pl.String})


def test_pandas_frame_conforms_to_the_schema_contract(pm, frames):
    frames(
        "orders",
        pd.DataFrame(
            {
                "customer": ["a", None, "c"],
                "spend": [1, 2, 3],
                "visits": [0.5, 1.5, None],
                "vip": [True, False, True],
                "country": ["DE", "FR", "US-CA"],
                "note": ["x", "y", "z"],
            }
        ),
    )
    frame = (
        open_frame(pm, "orders", id_column="customer", label="vip", jurisdiction_column="country")
        .scan()
        .collect()
    )
    # features default to every numeric column but id/label; text columns are left out
    assert frame.schema == pl.Schema(
        {
            "profile_id": pl.String,
            "spend": pl.Float64,
            "visits": pl.Float64,
            "vip": pl.Float64,
            "jurisdiction": pl.String,
        }
    )
    assert frame["profile_id"].to_list() == ["a", "c"]  # the null id is dropped
    assert frame["vip"].to_list() == [1.0, 1.0]
    assert frame["jurisdiction"].to_list() == ["DE", "US-CA"]


def test_polars_dataframe_and_lazyframe_are_accepted(pm, frames):
    data = {"profile_id": ["p1", "p2"], "x": [1, 2]}
    frames("eager", pl.DataFrame(data))
    frames("lazy", pl.LazyFrame(data))
    for name in ("eager", "lazy"):
        got = open_frame(pm, name).scan().collect()
        assert got.to_dict(as_series=False) == {"profile_id": ["p1", "p2"], "x": [1.0, 2.0]}
    assert {"eager", "lazy"} <= set(registered_frames())


def test_pandas_frame_is_snapshotted_at_registration(pm, frames):
    df = pd.DataFrame({"profile_id": ["p1"], "x": [1.0]})
    frames("snap", df)
    df.loc[0, "x"] = 99.0
    assert open_frame(pm, "snap").scan().collect()["x"].to_list() == [1.0]


def test_scan_request_semi_joins_allowed_ids_and_ands_predicates(pm, frames):
    frames("f", pl.DataFrame({"profile_id": ["a", "b", "c"], "x": [1, 2, 3]}))
    request = ScanRequest(allowed_ids=FakeAllowed(["a", "b"]), predicates=(pl.col("x") > 1,))
    assert open_frame(pm, "f").scan(request).collect()["profile_id"].to_list() == ["b"]


def test_declared_features_missing_or_text_are_refused(pm, frames):
    frames("f", pl.DataFrame({"profile_id": ["a"], "x": [1], "note": ["hi"]}))
    with pytest.raises(MissingColumnError) as missing:
        open_frame(pm, "f", features=["x", "y"]).scan()
    assert "'y'" in str(missing.value) and "profile_id, x, note" in str(missing.value)
    with pytest.raises(ColumnTypeError) as typed:
        open_frame(pm, "f", features=["note"]).scan()
    assert "note" in str(typed.value) and "String" in str(typed.value)


def test_unknown_frame_name_lists_registered_names(pm, frames):
    frames("known_one", pl.DataFrame({"profile_id": ["a"]}))
    with pytest.raises(ConnectorError) as info:
        open_frame(pm, "nope")
    assert "'nope'" in str(info.value) and "known_one" in str(info.value)


def test_frame_key_is_required(pm):
    with pytest.raises(ConfigError) as info:
        ConnectorRegistry(pm).open({"type": "frame", "name": "mem"})
    assert info.value.field == "mem.frame"


def test_wrong_object_type_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        register_frame("rows", [{"profile_id": "a"}])
    assert "list" in str(info.value) and "pandas.DataFrame" in str(info.value)
    assert "rows" not in registered_frames()
    with pytest.raises(ConfigError):
        register_frame("", pl.DataFrame())


def test_unregister_forgets_and_is_idempotent(pm):
    register_frame("temp", pl.DataFrame({"profile_id": ["a"]}))
    unregister_frame("temp")
    unregister_frame("temp")
    with pytest.raises(ConnectorError):
        open_frame(pm, "temp")


def test_unknown_connector_type_lists_registered_types(pm):
    with pytest.raises(UnknownConnectorError) as info:
        ConnectorRegistry(pm).open({"type": "excel", "name": "x"})
    message = str(info.value)
    for name in ("csv", "frame", "parquet", "segment", "sql"):
        assert name in message
