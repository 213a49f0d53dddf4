"""`cdp-fl policy check`: exit codes, JSON keys, line-numbered errors, the example jobs."""

from __future__ import annotations

import json

import pytest
import yaml

from cdp_federated.features import FEATURE_COLUMNS
from cdp_federated.governance.policy import load_policy
from tests.cli_helpers import run as run_cli

from .conftest import POLICIES

INTERNAL = str(POLICIES / "internal-regions.yaml")
GDPR = str(POLICIES / "gdpr-partner-collaboration.yaml")
DEMO_JOB = str(POLICIES / "examples" / "demo-job.yaml")
PII_JOB = str(POLICIES / "examples" / "pii-job.yaml")


def run(monkeypatch, capsys, *args):
    return run_cli(monkeypatch, capsys, "policy", "check", *args)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("CDP_FL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "200")


def test_a_valid_policy_prints_its_summary_and_hash(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, GDPR)
    assert code == 0
    assert load_policy(GDPR).content_hash in out
    assert "gdpr-partner-collaboration" in out and "psi" in out


def test_a_valid_policy_as_json(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, GDPR, "--json")
    data = json.loads(out)
    assert code == 0 and data["valid"] is True
    assert data["policy_hash"] == load_policy(GDPR).content_hash
    assert data["document"]["identity"] == {"methods": ["psi"]}


def test_the_demo_job_is_allowed_under_internal_regions(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, INTERNAL, "--job", DEMO_JOB)
    assert code == 0 and "ALLOWED" in out
    code, out, _ = run(monkeypatch, capsys, INTERNAL, "--job", DEMO_JOB, "--json")
    data = json.loads(out)
    assert code == 0 and data["allow"] is True
    assert {"policy", "version", "policy_hash", "allow", "reasons"} <= set(data)
    assert all(set(r) == {"rule", "ok", "message"} and r["ok"] for r in data["reasons"])


@pytest.mark.parametrize("participant", ["eu-west", "us-east", "uk"])
def test_the_demo_job_is_allowed_for_every_demo_region(monkeypatch, capsys, participant):
    code, out, _ = run(
        monkeypatch, capsys, INTERNAL, "--job", DEMO_JOB, "--participant", participant, "--json"
    )
    data = json.loads(out)
    assert code == 0 and data["allow"] and data["participant"] == participant


def test_the_demo_job_file_is_the_demo_job():
    job = yaml.safe_load(open(DEMO_JOB))
    assert tuple(job["features"]) == FEATURE_COLUMNS
    assert job["purpose"] == "model_training" and job["label"] == "purchased_30d"


def test_an_unlisted_participant_is_denied(monkeypatch, capsys):
    code, out, _ = run(
        monkeypatch, capsys, INTERNAL, "--job", DEMO_JOB, "--participant", "apac", "--json"
    )
    data = json.loads(out)
    assert code == 1 and data["allow"] is False
    assert {r["rule"] for r in data["reasons"] if not r["ok"]} == {
        "partners",
        "residency.data_regions",
    }


def test_the_pii_job_is_denied_for_the_right_reasons(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, GDPR, "--job", PII_JOB, "--json")
    data = json.loads(out)
    assert code == 1 and data["allow"] is False
    failed = {r["rule"]: r["message"] for r in data["reasons"] if not r["ok"]}
    assert set(failed) == {"features", "identity.methods"}
    assert failed["features"] == "email is built-in PII (email)"
    assert "acme-retail, globex-brands" in failed["identity.methods"]
    assert "dictionary attack" in failed["identity.methods"]
    assert data["policy_hash"] == load_policy(GDPR).content_hash


def test_the_pii_job_table_shows_every_rule(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, GDPR, "--job", PII_JOB)
    assert code == 1 and "DENIED" in out
    for rule in ("purposes.allowed", "features", "identity.methods", "privacy.dp.budget"):
        assert rule in out


BAD = """\
policy: bad
version: 1
purposes: {allowed: [model_training], lawful_basis: consent}
consent:
  unknown_jurisdiction: maybe
  purposes:
    model_training: {signals: [segment:Analytics]}
partners:
  - {name: a, organisation: x, region: EU, roles: [participant]}
featurs: {allowed: ["*"]}
residency: {data_regions: [EU], coordinator_regions: [EU]}
minimums: {rows_per_party: 10, cohort_size: 5}
identity: {methods: [psi]}
privacy: {secure_aggregation: required}
outputs: {uses: [scoring], retention_days: 30}
"""


def test_schema_errors_are_printed_with_line_numbers_and_exit_2(monkeypatch, capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    code, out, err = run(monkeypatch, capsys, str(path))
    assert code == 2 and out == ""
    assert "3 errors" in err
    assert f"{path}:5: consent.unknown_jurisdiction:" in err
    assert f"{path}:10: featurs: unknown key 'featurs'; did you mean 'features'?" in err
    assert f"{path}:1: features: missing required key 'features'" in err


def test_schema_errors_as_json(monkeypatch, capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    code, out, _ = run(monkeypatch, capsys, str(path), "--json", "--job", DEMO_JOB)
    data = json.loads(out)
    assert code == 2 and data["error"] == "PolicySchemaError"
    assert {(e["line"], e["path"]) for e in data["errors"]} == {
        (1, "features"),
        (5, "consent.unknown_jurisdiction"),
        (10, "featurs"),
    }


def test_a_yaml_syntax_error_exits_2_with_its_line(monkeypatch, capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("policy: x\nversion: [1\n")
    code, _, err = run(monkeypatch, capsys, str(path))
    assert code == 2 and "YAML syntax error" in err and f"{path}:" in err


def test_a_malformed_job_file_exits_2(monkeypatch, capsys, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(open(DEMO_JOB).read().replace("rounds: 30", "roundz: 30"))
    code, _, err = run(monkeypatch, capsys, INTERNAL, "--job", str(job))
    assert code == 2 and "roundz" in err


def test_a_job_file_without_participant_needs_the_option(monkeypatch, capsys, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(open(DEMO_JOB).read().replace("  participant: eu-west\n", ""))
    code, _, err = run(monkeypatch, capsys, INTERNAL, "--job", str(job))
    assert code == 2 and "--participant" in err
    code, _, _ = run(monkeypatch, capsys, INTERNAL, "--job", str(job), "--participant", "uk")
    assert code == 0


def test_the_vertical_submission_file_is_checked_as_a_party_decides_it(
    monkeypatch, capsys, tmp_path
):
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "vertical"
    submission = yaml.safe_load((example / "job.yaml").read_text())
    assert {"participants", "options"} <= set(submission)  # as `cdp-fl job submit` takes it
    job = tmp_path / "job.yaml"
    context = {"coordinator_region": "EU", "output_use": "scoring"}
    job.write_text(yaml.safe_dump({**submission, "context": context}))
    policy = str(example / "policy.yaml")
    code, out, err = run(
        monkeypatch, capsys, policy, "--job", str(job), "--participant", "brand", "--json"
    )
    assert code == 0, err
    decision = json.loads(out)
    assert decision["allow"] is True
    identity = next(r for r in decision["reasons"] if r["rule"] == "identity.methods")
    assert identity["ok"] and "psi" in identity["message"]
    # a party's policy that does not permit PSI refuses the same job for that reason
    strict = tmp_path / "policy.yaml"
    document = yaml.safe_load((example / "policy.yaml").read_text())
    document["identity"] = {"methods": []}  # no record linkage permitted at all
    strict.write_text(yaml.safe_dump(document))
    code, out, _ = run(
        monkeypatch, capsys, str(strict), "--job", str(job), "--participant", "brand", "--json"
    )
    failed = [r["rule"] for r in json.loads(out)["reasons"] if not r["ok"]]
    assert code == 1 and failed == ["identity.methods"]
