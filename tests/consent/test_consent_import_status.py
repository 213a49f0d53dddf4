"""Consent import (CSV all-or-nothing, JSONL through the host) and consent status, via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from tests.cli_helpers import run
from tests.consent.tcf_encoder import b64url, core_bits, vendor_section

POLICY = Path(__file__).parents[2] / "policies" / "gdpr-partner-collaboration.yaml"
AT = "2026-06-01T00:00:00Z"


@pytest.fixture
def db(monkeypatch, tmp_path):
    monkeypatch.setenv("CDP_FL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CDP_FL_DB", raising=False)
    return str(tmp_path / "ledger.sqlite")


def tc(purposes, vendors):
    return b64url(core_bits(purposes=purposes, vendor_consents=vendor_section(vendors)))


def write_csv(path, rows, header="profile_id,signal,granted,timestamp,jurisdiction,tc_string"):
    path.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
    return path


GOOD = [
    ("anna", "segment:Analytics", "true", "2026-05-01T10:00:00Z", "EU", ""),
    ("ben", "segment:Analytics", "granted", "2026-05-01T10:00:00Z", "EU", ""),
    ("ben", "consent_mode:analytics_storage", "denied", "2026-05-03T10:00:00Z", "EU", ""),
    ("carl", "tcf", "", "2026-05-01T10:00:00Z", "EU", tc({1, 7, 8, 9, 10}, {1234})),
    ("dora", "tcf", "", "2026-05-01T10:00:00Z", "EU", tc({1, 7, 8, 9, 10}, {755})),
    ("emil", "segment:Advertising", "1", "2026-05-01T10:00:00Z", "UK", ""),
]


def status(monkeypatch, capsys, db, profile, purpose="model_training"):
    args = ["consent", "status", profile, "--purpose", purpose, "--db", db]
    code, out, _ = run(monkeypatch, capsys, *args, "--policy", str(POLICY), "--at", AT, "--json")
    return code, json.loads(out)


def test_csv_import_then_status_explains_each_decision(monkeypatch, capsys, tmp_path, db):
    path = write_csv(tmp_path / "signals.csv", GOOD)
    code, out, _ = run(
        monkeypatch,
        capsys,
        "consent",
        "import",
        str(path),
        "--db",
        db,
        "--tcf-vendors",
        "1234",
        "--json",
    )
    result = json.loads(out)
    assert code == 0
    assert (result["rows"], result["profiles"]) == (6, 5)
    assert result["records"] == result["inserted"] > 6  # the TC strings expand to many signals

    code, anna = status(monkeypatch, capsys, db, "anna")
    assert (code, anna["allowed"], anna["reason"]) == (0, True, "granted by segment:Analytics")
    code, ben = status(monkeypatch, capsys, db, "ben")  # a later deny in another format wins
    assert (code, ben["allowed"]) == (1, False)
    assert ben["reason"] == "denied by consent_mode:analytics_storage"
    code, carl = status(monkeypatch, capsys, db, "carl")  # TC string grants purposes to vendor 1234
    assert (code, carl["allowed"]) == (0, True)
    assert carl["reason"].startswith("granted by the TC string")
    code, dora = status(monkeypatch, capsys, db, "dora")  # same purposes, but not our vendor
    assert (code, dora["allowed"]) == (1, False)
    code, emil = status(monkeypatch, capsys, db, "emil")  # advertising consent is not analytics
    assert (code, emil["allowed"], emil["jurisdiction"]) == (1, False, "UK")
    assert "opt-in" in emil["default"]
    code, nobody = status(monkeypatch, capsys, db, "nobody")
    assert (code, nobody["known_profile"], nobody["allowed"]) == (1, False, False)


def test_reimporting_the_same_file_adds_nothing(monkeypatch, capsys, tmp_path, db):
    path = write_csv(tmp_path / "signals.csv", GOOD)
    args = ["consent", "import", str(path), "--db", db, "--tcf-vendors", "1234", "--json"]
    first = json.loads(run(monkeypatch, capsys, *args)[1])
    again = json.loads(run(monkeypatch, capsys, *args)[1])
    assert first["inserted"] > 0 and again["inserted"] == 0
    assert again["records"] == first["records"]


def test_a_bad_row_refuses_the_whole_file_naming_rows_and_fix(monkeypatch, capsys, tmp_path, db):
    bad = [
        *GOOD[:2],
        ("fred", "Analytics", "true", "2026-05-01T10:00:00Z", "EU", ""),  # no namespace
        ("gina", "segment:Analytics", "maybe", "2026-05-01T10:00:00Z", "EU", ""),
        ("hugo", "segment:Analytics", "true", "2026-05-01 10:00:00", "EU", ""),  # naive time
        ("ida", "tcf", "", "2026-05-01T10:00:00Z", "EU", "not-a-tc-string!"),
    ]
    path = write_csv(tmp_path / "signals.csv", bad)
    code, _, err = run(monkeypatch, capsys, "consent", "import", str(path), "--db", db)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "nothing imported: 4 bad rows" in err
    for fragment in (
        "row 4: signal 'Analytics'",
        "row 5: granted 'maybe'",
        "row 6: timestamp",
        "row 7:",
    ):
        assert fragment in err
    assert "Fix:" in err
    code, anna = status(monkeypatch, capsys, db, "anna")
    assert anna["known_profile"] is False  # the good rows were not imported either


def test_missing_columns_are_named(monkeypatch, capsys, tmp_path, db):
    path = write_csv(tmp_path / "s.csv", [("anna", "true")], header="profile_id,granted")
    code, _, err = run(monkeypatch, capsys, "consent", "import", str(path), "--db", db)
    assert code == 2 and "['signal', 'timestamp']" in err


def test_jsonl_import_goes_through_the_host_with_dead_letters(monkeypatch, capsys, tmp_path, db):
    event = {
        "type": "track",
        "event": "Segment Consent Preference Updated",
        "messageId": "c1",
        "userId": "anna",
        "timestamp": "2026-05-01T10:00:00Z",
        "context": {
            "location": {"country": "DE"},
            "consent": {"categoryPreferences": {"Analytics": True}},
        },
    }
    path = tmp_path / "consent.jsonl"
    path.write_bytes(orjson.dumps(event) + b"\n{broken\n")
    code, out, _ = run(monkeypatch, capsys, "consent", "import", str(path), "--db", db, "--json")
    result = json.loads(out)
    assert code == 0 and (result["applied"], result["dead_lettered"]) == (1, 1)
    code, anna = status(monkeypatch, capsys, db, "anna")
    assert (code, anna["allowed"], anna["jurisdiction"]) == (0, True, "EU")
