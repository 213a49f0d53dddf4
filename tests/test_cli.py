"""CLI: commands call the library; typed errors become one line on stderr and exit code 2."""

from __future__ import annotations

import json

import orjson
import pytest

from tests.cli_helpers import run


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("CDP_FL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CDP_FL_DB", raising=False)


def events_file(tmp_path):
    rows = [
        {
            "type": "identify",
            "messageId": "1",
            "userId": "u1",
            "timestamp": "2026-05-01T00:00:00Z",
            "traits": {"email": "a@b.example"},
        },
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": "2",
            "userId": "u1",
            "timestamp": "2026-05-02T00:00:00Z",
            "properties": {"revenue": 10.5},
        },
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n{oops\n")
    return path


def test_help_lists_the_commands(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "--help")
    assert code == 0
    for command in (
        "demo",
        "ingest",
        "dead-letters",
        "db",
        "features",
        "connectors",
        "plugins",
        "settings",
    ):
        assert command in out


def test_ingest_json_uses_the_shared_result_schema(monkeypatch, capsys, tmp_path):
    db = tmp_path / "cdp.sqlite"
    code, out, err = run(
        monkeypatch, capsys, "ingest", str(events_file(tmp_path)), "--db", str(db), "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert (
        result["received"],
        result["applied"],
        result["dead_lettered"],
        result["duplicates"],
    ) == (3, 2, 1, 0)
    assert result["profiles"] == 1 and result["command"] == "ingest"
    code, out, _ = run(monkeypatch, capsys, "dead-letters", "--db", str(db), "--json")
    assert json.loads(out)["counts"] == {"malformed_json": 1}
    code, out, _ = run(monkeypatch, capsys, "db", "info", "--db", str(db), "--json")
    assert json.loads(out)["tables"]["events"] == 2


def test_typed_errors_exit_2_with_one_line(monkeypatch, capsys, tmp_path):
    code, out, err = run(
        monkeypatch,
        capsys,
        "ingest",
        str(tmp_path / "nope.jsonl"),
        "--db",
        str(tmp_path / "x.sqlite"),
    )
    assert code == 2
    assert err.startswith("error: cannot open events file") and err.count("\n") == 1
    code, _, err = run(monkeypatch, capsys, "db", "info", "--db", str(tmp_path / "empty.sqlite"))
    assert code == 2 and "cdp-fl db init" in err
    code, _, err = run(
        monkeypatch,
        capsys,
        "features",
        "build",
        "--db",
        str(tmp_path / "x.sqlite"),
        "--as-of",
        "soon",
    )
    assert code == 2 and "--as-of" in err


def test_default_store_lives_under_the_data_dir(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "db", "init")
    assert code == 0 and str(tmp_path / "data" / "cdp.sqlite") in err
