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


class _StatusClient:
    """Replays job statuses as the coordinator would return them while the job runs."""

    def __init__(self, statuses):
        self.statuses = list(statuses)

    def job_status(self, job_id, wait=None):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]


def _status(state, history, metrics=None):
    return {
        "job_id": "j1",
        "status": state,
        "rounds": 3,
        "rounds_done": len(history),
        "history": history,
        "metrics": metrics or {},
    }


@pytest.mark.parametrize(
    ("history", "metrics", "expected"),
    [
        # a GBM job: tree entries carry no train_loss, regression reports rmse/mae
        ([{"round": 1, "leaves": 4, "splits": 3}], {"rmse": 1.25, "mae": 0.5}, "rmse 1.2500"),
        # a vertical job: a null loss, binary metrics without logloss
        ([{"round": 1, "train_loss": None}], {"auc": 0.75}, "auc 0.7500"),
        ([{"round": 1, "train_loss": 0.5}], {"auc": 0.8, "logloss": 0.4}, "logloss 0.4000"),
    ],
)
def test_job_follow_and_status_handle_every_model_kind(capsys, history, metrics, expected):
    from cdp_federated.cli.runtime import _follow, _print_status

    client = _StatusClient(
        [
            _status("running", []),
            _status("running", history),
            _status("succeeded", history, metrics),
        ]
    )
    final = _follow(client, "j1", as_json=True)
    _print_status(final, as_json=False)
    line = capsys.readouterr().out
    assert line.startswith("job j1: succeeded, rounds 1/3")
    assert expected in line
