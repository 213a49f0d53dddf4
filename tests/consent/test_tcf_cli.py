"""`cdp-fl consent decode-tcf`: readable summary, --json with the decoder's keys, exit 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cdp_federated.consent.tcf import decode_tc_string
from tests.cli_helpers import run

# GDPR::IAB::TCFv2 PublisherRestrictions docs (https://metacpan.org/pod/GDPR::IAB::TCFv2::PublisherRestrictions)
RESTRICTED = "COwAdDhOwAdDhN4ABAENAPCgAAQAAv___wAAAFP_AAp_4AI6ACACAA"
# iabtcf-java TCStringV2Test: core + disclosed vendors + allowed vendors
WITH_OOB = (
    "COrEAV4OrXx94ACABBENAHCIAD-AAAAAAACAAxAAAAgAIAwgAgAAAAEAgQAAAAAEAYQAQAAAACAAAABAAA."
    "IBAgAAAgAIAwgAgAAAAEAAAACA.QAagAQAgAIAwgA"
)
KEYS = [
    "version",
    "created",
    "last_updated",
    "cmp_id",
    "cmp_version",
    "consent_screen",
    "consent_language",
    "vendor_list_version",
    "tcf_policy_version",
    "is_service_specific",
    "use_non_standard_texts",
    "special_feature_optins",
    "purposes_consent",
    "purposes_li_transparency",
    "purpose_one_treatment",
    "publisher_cc",
    "vendor_consents",
    "vendor_legitimate_interests",
    "publisher_restrictions",
    "disclosed_vendors",
    "allowed_vendors",
    "publisher_tc",
]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("CDP_FL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CDP_FL_DB", raising=False)


def test_summary_is_readable(monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys, "consent", "decode-tcf", RESTRICTED)
    assert code == 0, err
    assert "CMP 888 version 1" in out
    assert "vendors with consent (10): 1-10" in out
    assert "purpose 7, require consent: vendors 32" in out
    assert "publisher TC: absent" in out


def test_summary_lists_oob_segments(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "consent", "decode-tcf", WITH_OOB)
    assert code == 0
    assert "allowed vendors: 12, 23, 37, 47-48, 53" in out
    assert "disclosed vendors: 23, 37, 47-48, 53, 65, 98, 129" in out


def test_json_has_exactly_the_decoder_keys(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "consent", "decode-tcf", WITH_OOB, "--json")
    assert code == 0
    data = json.loads(out)
    assert list(data) == KEYS
    assert data == decode_tc_string(WITH_OOB).to_dict()
    assert data["allowed_vendors"] == [12, 23, 37, 47, 48, 53]
    assert data["publisher_tc"] is None


def test_invalid_string_exits_2_with_one_line(monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys, "consent", "decode-tcf", RESTRICTED + "==")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "field=tc_string" in err and "padding" in err


def test_version_1_exits_2(monkeypatch, capsys):
    # the example string of the TCF v1.1 spec ("Consent string and vendor list formats v1.1
    # Final.md" in InteractiveAdvertisingBureau/GDPR-Transparency-and-Consent-Framework)
    code, _, err = run(
        monkeypatch, capsys, "consent", "decode-tcf", "BOEFEAyOEFEAyAHABDENAI4AAAB9vABAASA"
    )
    assert code == 2 and "field=core.version" in err and err.count("\n") == 1


def test_installed_console_script():
    script = Path(sys.executable).parent / "cdp-fl"
    if not script.exists():
        pytest.skip("cdp-fl console script is not installed in this environment")
    ok = subprocess.run(
        [str(script), "consent", "decode-tcf", RESTRICTED, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["publisher_restrictions"] == [
        {"purpose": 7, "type": 1, "vendors": [32]}
    ]
    bad = subprocess.run(
        [str(script), "consent", "decode-tcf", RESTRICTED[:12]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "truncated" in bad.stderr
