"""`cdp-fl audit ...`: exit 0 when the log verifies, 1 when tampering is detected, 2 on usage or
configuration errors; JSON output keys."""

from __future__ import annotations

import json
import os
import stat

import pytest
from sqlalchemy import delete, update

from cdp_federated.governance.audit import CONSENT_FILTER, POLICY_DECISION, AuditLog
from cdp_federated.store import open_store, schema
from tests.cli_helpers import run

VERIFY_KEYS = {"ok", "entries", "first_bad_seq", "reason", "latest_checkpoint", "unsigned_tail"}


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("CDP_FL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CDP_FL_DB", raising=False)
    monkeypatch.delenv("CDP_FL_AUDIT_KEY", raising=False)


@pytest.fixture
def db(tmp_path, monkeypatch, capsys):
    """A store with a signed 6-entry chain, keyed by `cdp-fl audit init-key`."""
    path = tmp_path / "cdp.sqlite"
    code, out, _ = run(monkeypatch, capsys, "audit", "init-key")
    assert code == 0 and "created audit key" in out
    store = open_store(str(path), create=True)
    log = AuditLog.open(store)
    for i in range(5):
        log.append(POLICY_DECISION, {"allow": i % 2 == 0, "rule": f"r{i}"})
    log.append(
        CONSENT_FILTER,
        {
            "participant": "retailer",
            "purpose": "analytics",
            "rows_in": 10,
            "consented": 8,
            "aligned": None,
            "trained": 8,
        },
    )
    log.checkpoint()
    store.dispose()
    return path


def test_audit_help_lists_the_commands(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "audit", "--help")
    assert code == 0
    for command in ("verify", "log", "checkpoint", "init-key", "export-key"):
        assert command in out


def test_init_key_creates_a_private_key_once(monkeypatch, capsys, tmp_path):
    code, out, _ = run(monkeypatch, capsys, "audit", "init-key")
    path = tmp_path / "data" / "keys" / "audit-ed25519.key"
    assert code == 0 and str(path) in out
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    before = path.read_bytes()
    code, out, _ = run(monkeypatch, capsys, "audit", "init-key")
    assert code == 0 and "exists" in out and path.read_bytes() == before


def test_verify_ok_exits_0(db, monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "audit", "verify", "--db", str(db))
    assert code == 0, out
    assert "audit log OK: 6 entries" in out and "anchor match" in out


def test_verify_json(db, monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "audit", "verify", "--db", f"sqlite:///{db}", "--json")
    assert code == 0
    result = json.loads(out)
    assert VERIFY_KEYS <= set(result)
    assert result["ok"] is True and result["entries"] == 6 and result["unsigned_tail"] == 0
    assert result["latest_checkpoint"]["seq"] == 6 and result["first_bad_seq"] is None
    assert result["anchor"]["status"] == "match"


def test_tampering_exits_1_and_names_the_first_bad_entry(db, monkeypatch, capsys):
    store = open_store(str(db))
    with store.begin() as conn:
        conn.execute(
            update(schema.audit_entries)
            .where(schema.audit_entries.c.seq == 3)
            .values(payload={"allow": False, "rule": "r2"})
        )
    store.dispose()
    code, out, _ = run(monkeypatch, capsys, "audit", "verify", "--db", str(db))
    assert code == 1
    assert "TAMPERED" in out and "seq 3" in out
    code, out, _ = run(monkeypatch, capsys, "audit", "verify", "--db", str(db), "--json")
    result = json.loads(out)
    assert code == 1 and result["ok"] is False and result["first_bad_seq"] == 3
    assert "edited" in result["reason"]


def test_truncation_exits_1(db, monkeypatch, capsys):
    store = open_store(str(db))
    with store.begin() as conn:
        conn.execute(delete(schema.audit_entries).where(schema.audit_entries.c.seq > 4))
        conn.execute(delete(schema.audit_checkpoints))
    store.dispose()
    code, out, _ = run(monkeypatch, capsys, "audit", "verify", "--db", str(db), "--json")
    assert code == 1 and json.loads(out)["first_bad_seq"] == 5


def test_unsigned_tail_warns_and_strict_fails(db, monkeypatch, capsys):
    store = open_store(str(db))
    AuditLog.open(store).append(POLICY_DECISION, {"allow": True})
    store.dispose()
    code, out, err = run(monkeypatch, capsys, "audit", "verify", "--db", str(db))
    assert code == 0 and "unsigned tail 1" in out and "warning: unsigned tail" in err
    code, out, _ = run(monkeypatch, capsys, "audit", "verify", "--db", str(db), "--strict")
    assert code == 1 and "strict" in out
    code, out, _ = run(monkeypatch, capsys, "audit", "checkpoint", "--db", str(db))
    assert code == 0 and "signed head seq 7" in out
    code, _, _ = run(monkeypatch, capsys, "audit", "verify", "--db", str(db), "--strict")
    assert code == 0


def test_verify_with_an_exported_public_key(db, monkeypatch, capsys, tmp_path):
    code, pem, _ = run(monkeypatch, capsys, "audit", "export-key")
    assert code == 0 and pem.startswith("-----BEGIN PUBLIC KEY-----")
    public = tmp_path / "verifier" / "audit.pub"
    public.parent.mkdir()
    public.write_text(pem)
    anchors = list((tmp_path / "data" / "keys").glob("audit-head-*.json"))
    assert len(anchors) == 1
    args = ("audit", "verify", "--db", str(db), "--public-key", str(public))
    code, out, err = run(monkeypatch, capsys, *args, "--anchor", str(anchors[0]))
    assert code == 0 and "anchor match" in out
    code, out, err = run(monkeypatch, capsys, *args)
    assert code == 0 and "anchor missing" in out and "warning" in err
    code, _, _ = run(monkeypatch, capsys, *args, "--strict")
    assert code == 1


def test_configuration_errors_exit_2(db, monkeypatch, capsys, tmp_path):
    code, _, err = run(
        monkeypatch,
        capsys,
        "audit",
        "verify",
        "--db",
        str(db),
        "--key",
        str(tmp_path / "absent.key"),
    )
    assert code == 2 and "audit key file not found" in err
    code, _, err = run(
        monkeypatch, capsys, "audit", "verify", "--db", str(db), "--key", "a", "--public-key", "b"
    )
    assert code == 2 and "not both" in err
    code, _, err = run(monkeypatch, capsys, "audit", "verify", "--db", str(tmp_path / "new.sqlite"))
    assert code == 2 and "db init" in err


def test_log_lists_entries(db, monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "audit", "log", "--db", str(db), "--json")
    assert code == 0
    entries = json.loads(out)["entries"]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert set(entries[0]) == {"seq", "timestamp", "kind", "payload", "prev_hash", "hash"}
    code, out, _ = run(
        monkeypatch, capsys, "audit", "log", "--db", str(db), "--kind", CONSENT_FILTER, "--json"
    )
    assert [e["payload"]["trained"] for e in json.loads(out)["entries"]] == [8]
    code, out, _ = run(
        monkeypatch, capsys, "audit", "log", "--db", str(db), "--limit", "2", "--json"
    )
    assert [e["seq"] for e in json.loads(out)["entries"]] == [5, 6]
    code, out, _ = run(monkeypatch, capsys, "audit", "log", "--db", str(db))
    assert code == 0 and "policy_decision" in out and "consent_filter" in out
