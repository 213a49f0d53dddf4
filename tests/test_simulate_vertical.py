"""``cdp-fl simulate vertical``: party files with different columns, shuffled partially overlapping
rows and identifiers written differently; PSI or salted-hash alignment; SecureBoost over the
sealed in-process relay, compared with scikit-learn on the joined rows and with the label party
alone. HE runs use 1024-bit keys (hidden --insecure-test-keys) for speed."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from cdp_federated.errors import (
    ConfigError,
    IdentifierError,
    NoTrainingDataError,
    PolicyViolation,
)
from cdp_federated.simulate_vertical import VerticalSettings, simulate_vertical
from tests.cli_helpers import run

pytest.importorskip("heu")

FAST = VerticalSettings(trees=3, depth=3, max_bins=16, key_bits=1024, insecure_keys=True)


def customers(n, seed, objective="binary"):
    """One population: shop features (weak), brand features (strong), and the label."""
    rng = np.random.default_rng(seed)
    shop = rng.normal(size=(n, 2))
    brand = rng.normal(size=(n, 3))
    signal = 0.4 * shop[:, 0] + 1.5 * brand[:, 1] - brand[:, 2]
    if objective == "binary":
        y = (signal + rng.normal(scale=0.5, size=n) > 0).astype(int)
    else:
        y = signal + rng.normal(scale=0.3, size=n)
    emails = [f"user{i}@example.com" for i in range(n)]
    return emails, shop, brand, y


def write_parties(tmp_path, tag, n, seed, *, objective="binary", brand_label=False):
    """shop: 85% of the customers, lower-case emails, CSV; brand: another 85%, emails with
    capitals and spaces, shuffled, Parquet. Returns {name: path}."""
    emails, shop, brand, y = customers(n, seed, objective)
    rng = np.random.default_rng(seed + 1)
    shop_rows = rng.permutation(n)[: int(0.85 * n)]
    brand_rows = rng.permutation(n)[: int(0.85 * n)]
    shop_file = tmp_path / f"shop_{tag}.csv"
    pl.DataFrame(
        {
            "email": [emails[i] for i in shop_rows],
            "visits": shop[shop_rows, 0],
            "basket": shop[shop_rows, 1],
            "bought": y[shop_rows],
        }
    ).write_csv(shop_file)
    brand_frame = pl.DataFrame(
        {
            "mail": [f"  {emails[i].upper()} " for i in brand_rows],
            "f1": brand[brand_rows, 0],
            "f2": brand[brand_rows, 1],
            "f3": brand[brand_rows, 2],
        }
    )
    if brand_label:
        brand_frame = brand_frame.with_columns(pl.Series("bought", y[brand_rows]))
    brand_file = tmp_path / f"brand_{tag}.parquet"
    brand_frame.rename({"mail": "email"}).write_parquet(brand_file)
    overlap = len(np.intersect1d(shop_rows, brand_rows))
    return {"shop": shop_file, "brand": brand_file}, overlap


@pytest.fixture
def files(tmp_path):
    train, overlap = write_parties(tmp_path, "train", 400, 1)
    test, test_overlap = write_parties(tmp_path, "test", 240, 2)
    return train, test, overlap, test_overlap


def args(train, test, *extra):
    out = ["simulate", "vertical", "--key", "email", "--label", "bought", "--label-party", "shop"]
    for name, path in train.items():
        out += ["--party", f"{name}={path}"]
    for name, path in test.items():
        out += ["--test-party", f"{name}={path}"]
    return [*out, "--trees", "3", "--depth", "3", "--max-bins", "16", *extra]


def test_the_cli_aligns_trains_over_the_relay_and_beats_the_label_party(monkeypatch, capfd, files):
    train, test, overlap, test_overlap = files
    code, out, err = run(monkeypatch, capfd, *args(train, test, "--insecure-test-keys", "--json"))
    assert code == 0, err
    result = json.loads(out)  # fd 1 is clean: native HE logs went to stderr

    assert result["command"] == "simulate vertical" and result["status"] == "ok"
    assert result["intersection_size"] == overlap  # every shared customer, despite the formats
    assert result["test_intersection_size"] == test_overlap
    assert result["rows_per_party"] == {"shop": 340, "brand": 340}
    assert result["features"] == {"shop": ["visits", "basket"], "brand": ["f1", "f2", "f3"]}
    assert result["he"] == "paillier-1024-insecure" and result["rounds"] == 3
    assert result["bytes_exchanged"] > 0 and result["seconds"] > 0
    # the brand's features carry the signal: federating helps, and matches pooling the data
    assert result["auc"] > result["label_party_only_auc"] + 0.1
    assert abs(result["auc"] - result["centralized_auc"]) < 0.05


def test_salted_hash_ou_and_regression(tmp_path):
    train, overlap = write_parties(tmp_path, "train", 300, 3, objective="regression")
    test, _ = write_parties(tmp_path, "test", 160, 4, objective="regression")
    settings = VerticalSettings(
        objective="regression", he="ou", trees=3, depth=3, max_bins=16, key_bits=1024,
        insecure_keys=True,
    )  # fmt: skip
    result = simulate_vertical(
        train,
        key="email",
        label="bought",
        label_party="shop",
        test_parties=test,
        align="salted-hash",
        settings=settings,
    )
    assert result["intersection_size"] == overlap and result["he"] == "ou-1024-insecure"
    assert "auc" not in result
    assert result["rmse"] < result["label_party_only_rmse"] - 0.2
    assert abs(result["rmse"] - result["centralized_rmse"]) < 0.25


def call(train, test, **kwargs):
    options = dict(key="email", label="bought", label_party="shop", settings=FAST)
    return simulate_vertical(train, test_parties=test, **{**options, **kwargs})


def test_the_label_at_a_passive_party_is_a_policy_violation(tmp_path):
    train, _ = write_parties(tmp_path, "train", 60, 5, brand_label=True)
    test, _ = write_parties(tmp_path, "test", 60, 6)
    with pytest.raises(PolicyViolation, match="label must not leave the active party") as err:
        call(train, test)
    assert err.value.value == "brand"


def test_an_unknown_label_party_is_refused(files):
    train, test, *_ = files
    with pytest.raises(ConfigError, match="unknown --label-party") as err:
        call(train, test, label_party="media")
    assert err.value.field == "--label-party" and "brand" in err.value.fix


def test_a_party_with_no_overlap_is_named(tmp_path, files):
    train, test, *_ = files
    pl.DataFrame({"email": [f"other{i}@example.org" for i in range(50)], "g": np.arange(50.0)}).write_csv(
        tmp_path / "media.csv"
    )  # fmt: skip
    with pytest.raises(NoTrainingDataError, match="no overlap with the label party") as err:
        call(
            {**train, "media": tmp_path / "media.csv"},
            {**test, "media": tmp_path / "media.csv"},
        )
    assert err.value.value == ["media"]


def test_identifiers_of_another_kind_or_duplicated_are_refused(tmp_path, files):
    train, test, *_ = files
    phones = tmp_path / "phones.csv"
    pl.DataFrame({"email": ["+1 415 555 0100", "n/a"], "g": [1.0, 2.0]}).write_csv(phones)
    with pytest.raises(IdentifierError, match="none of its 2 identifiers"):
        call({**train, "brand": phones}, test)
    twice = tmp_path / "twice.csv"
    pl.DataFrame({"email": ["a@x.com", " A@X.com", "b@x.com"], "g": [1.0, 2.0, 3.0]}).write_csv(
        twice
    )
    with pytest.raises(IdentifierError, match="several rows"):
        call({**train, "brand": twice}, test)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model": "gbm"}, "--model"),
        ({"he": "rsa"}, "--he"),
        ({"objective": "poisson"}, "--objective"),
    ],
)
def test_bad_settings_name_the_option(change, field):
    with pytest.raises(ConfigError) as err:
        VerticalSettings(**change)
    assert err.value.field == field


def test_vertical_logreg_over_the_relay_equals_the_centralized_descent(files):
    train, test, overlap, _ = files
    settings = VerticalSettings(
        model="logreg", trees=8, learning_rate=0.5, key_bits=1024, insecure_keys=True
    )
    result = call(train, test, settings=settings)

    assert result["intersection_size"] == overlap and result["rounds"] == 8
    # same gradient steps as full-batch descent on the joined rows, up to fixed-point error
    assert abs(result["auc"] - result["centralized_auc"]) < 1e-3
    assert result["auc"] > result["label_party_only_auc"] + 0.1


def test_cli_errors_are_one_line_and_exit_2(monkeypatch, capsys, files):
    train, test, *_ = files
    code, out, err = run(
        monkeypatch, capsys, *args(train, {"shop": test["shop"]}, "--insecure-test-keys")
    )
    assert code == 2 and "--test-party" in err and "Traceback" not in err
    code, _, err = run(monkeypatch, capsys, *args(train, test, "--align", "bloom"))
    assert code == 2 and "unknown alignment" in err
    code, _, err = run(monkeypatch, capsys, *args(train, test, "--he-workers", "0"))
    assert code == 2 and "--he-workers" in err and "Traceback" not in err


@pytest.mark.slow
def test_he_worker_processes_give_the_same_model(monkeypatch, capfd, files):
    train, test, *_ = files
    results = []
    for workers in ("1", "2"):
        extra = ("--insecure-test-keys", "--he", "ou", "--he-workers", workers, "--json")
        code, out, err = run(monkeypatch, capfd, *args(train, test, *extra))
        assert code == 0, err
        results.append(json.loads(out))
    assert results[0]["auc"] == results[1]["auc"]
    assert results[0]["label_party_only_auc"] == results[1]["label_party_only_auc"]


def test_a_crashing_passive_party_fails_the_run_fast_with_its_error(monkeypatch, files):
    from cdp_federated.learning.vertical import PassiveParty
    from cdp_federated.learning.vertical.messages import SBGradients

    original = PassiveParty.handle

    def crash(self, message):
        if isinstance(message, SBGradients):
            raise RuntimeError("disk full at the brand")
        return original(self, message)

    monkeypatch.setattr(PassiveParty, "handle", crash)
    train, test, *_ = files
    with pytest.raises(RuntimeError, match="disk full at the brand"):
        call(train, test)


def test_the_issues_model_names_gbm_and_linear(monkeypatch, capfd, files):
    train, test, *_ = files
    keys = ("--insecure-test-keys", "--he", "ou", "--json")
    code, out, err = run(monkeypatch, capfd, *args(train, test, "--model", "linear", *keys))
    assert code == 0, err
    linear = json.loads(out)
    # vertical linear regression: RMSE, and the same descent as on the joined rows
    assert {"rmse", "centralized_rmse", "label_party_only_rmse"} <= set(linear)
    assert "auc" not in linear
    assert abs(linear["rmse"] - linear["centralized_rmse"]) < 1e-3
    code, out, err = run(monkeypatch, capfd, *args(train, test, "--model", "gbm", *keys))
    assert code == 0, err
    assert "auc" in json.loads(out)  # gbm is SecureBoost, binary by default
    bad = ("--model", "linear", "--objective", "binary", "--insecure-test-keys")
    code, _, err = run(monkeypatch, capfd, *args(train, test, *bad))
    assert code == 2 and "--objective" in err and "Traceback" not in err
