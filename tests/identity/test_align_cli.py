"""`cdp-fl align`: both methods end to end from files, alignment files, policy and cohort rules."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from cdp_federated.identity.keyed_hash import derive_key, hmac_token, new_federation_secret
from cdp_federated.identity.salted import run_salted_hash
from tests.cli_helpers import run

POLICIES = Path(__file__).parents[2] / "policies"


@pytest.fixture
def files(tmp_path):
    # The retailer writes emails as typed; the brand exports them trimmed and lower-cased.
    shop = [f"Customer.{i}@Example.com" for i in range(400)] + ["not-an-email", None, ""]
    brand = [f"  customer.{i}@example.com" for i in range(250, 900)] + ["customer.3@example.com"]
    pl.DataFrame({"email": shop}).write_parquet(tmp_path / "shop.parquet")
    pl.DataFrame({"email": brand, "spend": range(len(brand))}).write_csv(tmp_path / "brand.csv")
    return tmp_path, shop, brand


def align(monkeypatch, capsys, tmp, *extra, left="shop", right="brand"):
    args = [
        "align",
        "--left",
        f"{left}={tmp / 'shop.parquet'}",
        "--right",
        f"{right}={tmp / 'brand.csv'}",
        "--key",
        "email",
        "--json",
        *extra,
    ]
    code, out, err = run(monkeypatch, capsys, *args)
    return code, (json.loads(out) if code == 0 else None), err


@pytest.mark.parametrize("method", ["psi", "salted-hash"])
def test_both_methods_find_the_overlap_and_write_aligned_rows(monkeypatch, capsys, files, method):
    tmp, shop, brand = files
    extra = ["--method", method, "--reveal", "both", "--out", str(tmp / "out")]
    code, result, _ = align(monkeypatch, capsys, tmp, *extra)
    assert code == 0
    assert result["intersection_size"] == 151  # customers 250..399 plus customer 3
    assert (result["left_size"], result["right_size"]) == (403, 651)
    assert result["invalid"] == {"shop": 2, "brand": 0}  # "not-an-email" and "" (None is missing)
    left = pl.read_parquet(result["alignment_files"]["shop"])["row"].to_list()
    right = pl.read_parquet(result["alignment_files"]["brand"])["row"].to_list()
    # Row k of each side is the same customer (the common order).
    assert [shop[i].lower() for i in left] == [brand[j].strip() for j in right]
    assert result["bytes_exchanged"] > 0


def test_cardinality_mode_reveals_no_rows(monkeypatch, capsys, files):
    tmp, _, _ = files
    code, result, _ = align(monkeypatch, capsys, tmp, "--cardinality", "--out", str(tmp / "o"))
    assert code == 0 and result["intersection_size"] == 151
    assert result["alignment_files"] == {}


def test_policy_refuses_salted_hash_across_organisations(monkeypatch, capsys, files, tmp_path):
    tmp, _, _ = files
    policy = POLICIES / "gdpr-partner-collaboration.yaml"
    text = policy.read_text()
    names = [
        line.split("name:")[1].split(",")[0].strip()
        for line in text.splitlines()
        if "{name:" in line
    ]
    left, right = names[0], names[1]
    code, _, err = align(
        monkeypatch,
        capsys,
        tmp,
        "--method",
        "salted-hash",
        "--policy",
        str(policy),
        left=left,
        right=right,
    )
    assert code == 2 and "identity.methods" in err
    code, result, _ = align(
        monkeypatch, capsys, tmp, "--policy", str(policy), left=left, right=right
    )
    assert code == 0 and result["intersection_size"] == 151  # PSI is allowed


def test_small_overlaps_are_suppressed_below_the_cohort_minimum(monkeypatch, capsys, tmp_path):
    pl.DataFrame({"email": ["a@x.com", "b@x.com", "c@x.com"]}).write_parquet(
        tmp_path / "shop.parquet"
    )
    pl.DataFrame({"email": ["a@x.com", "z@x.com"]}).write_csv(tmp_path / "brand.csv")
    policy = POLICIES / "internal-regions.yaml"  # cohort_size 10
    code, result, _ = align(
        monkeypatch, capsys, tmp_path, "--policy", str(policy), left="eu-west", right="uk"
    )
    assert code == 0 and result["intersection_size"] == "<10"


def test_bad_inputs_are_named(monkeypatch, capsys, files):
    tmp, _, _ = files
    code, _, err = run(monkeypatch, capsys, "align", "--left", "x", "--right", "y=z", "--key", "e")
    assert code == 2 and "NAME=PATH" in err
    code, _, err = align(monkeypatch, capsys, tmp, "--method", "magic")
    assert code == 2 and "--method" in err
    args = ["align", "--left", f"a={tmp / 'shop.parquet'}", "--right", f"b={tmp / 'brand.csv'}"]
    code, _, err = run(monkeypatch, capsys, *args, "--key", "mail")
    assert code == 2 and "has no column 'mail'" in err and "email" in err


def test_salted_tokens_on_the_wire_are_neither_ids_nor_their_sha256():
    import hashlib

    ids = [f"person{i}@example.com" for i in range(50)]
    frames: list[bytes] = []

    def factory(handlers, recorder):
        from cdp_federated.federation.transport import InProcessTransport

        return InProcessTransport(
            handlers, recorder=lambda d, p, f: (frames.append(f), recorder(d, p, f))
        )

    key = derive_key(new_federation_secret(), "wire-test")
    result = run_salted_hash(
        ids[:30], ids[20:], key, reveal_to=("left", "right"), transport_factory=factory
    )
    assert result.intersection_size == 10
    blob = b"".join(frames)
    for value in ids:
        assert value.encode() not in blob
        assert hashlib.sha256(value.encode()).digest() not in blob
        assert hashlib.sha256(value.encode()).hexdigest().encode() not in blob
    # The tokens themselves do travel (that is the method): which is why it is one-organisation only.
    assert hmac_token(ids[25], key) in blob
