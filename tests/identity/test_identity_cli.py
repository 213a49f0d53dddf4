"""`cdp-fl identity normalize`: JSON keys and values, human output, exit codes."""

from __future__ import annotations

import json

import pytest

from tests.cli_helpers import run


def test_uid2_email_json_matches_the_published_example(monkeypatch, capsys):
    # Source: https://unifiedid.com/docs/getting-started/gs-normalization-encoding
    code, out, err = run(
        monkeypatch, capsys, "identity", "normalize", "JaneSaoirse+Work@gmail.com",
        "--kind", "email", "--scheme", "uid2", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out) == {
        "normalized": "janesaoirse@gmail.com",
        "sha256_hex": "92ee26057ed9dea2535d6c8b141d48373932476599196e00352254896db5888f",
        "sha256_b64": "ku4mBX7Z3qJTXWyLFB1INzkyR2WZGW4ANSJUiW21iI8=",
    }


def test_meta_phone_with_region(monkeypatch, capsys):
    # Source: https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/customer-information-parameters
    code, out, err = run(
        monkeypatch, capsys, "identity", "normalize", "(650)555-1212",
        "--kind", "phone", "--scheme", "meta", "--region", "US", "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"normalized", "sha256_hex", "sha256_b64"}
    assert result["normalized"] == "16505551212"
    assert (
        result["sha256_hex"] == "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"
    )


def test_human_output_marks_the_hash_the_scheme_sends(monkeypatch, capsys):
    code, out, _ = run(
        monkeypatch, capsys, "identity", "normalize", "cloudySanFrancisco@GMAIL.com",
        "--kind", "email", "--scheme", "google",
    )  # fmt: skip
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "normalized: cloudysanfrancisco@gmail.com"
    assert lines[1].startswith(
        "sha256_hex: 223ebda6f6889b1494551ba902d9d381daf2f642bae055888e96343d53e9f9c4"
    )
    assert "google sends this" in lines[1] and lines[2].startswith("sha256_b64: ")


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["not-an-email", "--kind", "email", "--scheme", "uid2"], "exactly one @"),
        (["650 555 1212", "--kind", "phone", "--scheme", "google"], "no country code"),
        (["+1 123 456 7890", "--kind", "phone", "--scheme", "meta"], "not a valid number"),
        (["650 555 1212", "--kind", "phone", "--scheme", "meta", "--region", "ZZ"], "region"),
    ],
)
def test_invalid_input_exits_2_with_the_reason(monkeypatch, capsys, args, reason):
    code, out, err = run(monkeypatch, capsys, "identity", "normalize", *args, "--json")
    assert code == 2
    assert out == ""
    assert err.startswith("error: ") and reason in err


@pytest.mark.parametrize(
    "args",
    [
        ["a@b.co", "--kind", "email", "--scheme", "tiktok"],
        ["a@b.co", "--kind", "ssn", "--scheme", "uid2"],
        ["a@b.co", "--scheme", "uid2"],
    ],
)
def test_usage_errors_exit_2(monkeypatch, capsys, args):
    code, out, _ = run(monkeypatch, capsys, "identity", "normalize", *args)
    assert code == 2 and out == ""
