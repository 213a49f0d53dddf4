"""``cdp-fl simulate horizontal --secure-aggregation [--dropout F]``: the same model as plain FedAvg
within fixed-point error, dropouts after key sharing recovered, and the combinations it cannot
serve refused with the option to change."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from tests.cli_helpers import run

PARTIES = ("a", "b", "c", "d", "e")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secagg-parties")
    rng = np.random.default_rng(8)
    paths = {}
    for i, name in enumerate((*PARTIES, "test")):
        shift = 0.0 if name == "test" else (i - 2) * 0.3
        x = rng.normal(shift, 1.0, size=(300, 6))
        churn = (x[:, :3] @ np.array([1.0, -0.7, 0.4]) + rng.logistic(size=300) > 0).astype(int)
        paths[name] = folder / f"{name}.csv"
        pl.DataFrame({**{f"x{j}": x[:, j] for j in range(6)}, "churn": churn}).write_csv(
            paths[name]
        )
    return paths


def _simulate(monkeypatch, capsys, files, registry, *extra, parties=PARTIES):
    args = [a for p in parties for a in ("--party", f"{p}={files[p]}")]
    code, out, err = run(
        monkeypatch,
        capsys,
        "simulate",
        "horizontal",
        *args,
        "--test",
        str(files["test"]),
        "--label",
        "churn",
        "--rounds",
        "3",
        "--registry",
        str(registry),
        "--json",
        *extra,
    )
    return code, (json.loads(out) if code == 0 else None), err


def _model(result) -> np.ndarray:
    return np.array(json.loads(open(result["model_path"]).read())["parameters"]["coef"])


def test_secure_aggregation_matches_plain_fedavg(monkeypatch, capsys, files, tmp_path):
    code, plain, _ = _simulate(monkeypatch, capsys, files, tmp_path)
    assert code == 0
    code, secure, err = _simulate(monkeypatch, capsys, files, tmp_path, "--secure-aggregation")
    assert code == 0, err
    assert abs(secure["auc"] - plain["auc"]) <= 1e-3
    assert abs(secure["logloss"] - plain["logloss"]) <= 1e-3
    assert secure["secure_aggregation"] == {"participants": 5, "dropped": 0, "recovered": 0}
    assert secure["bytes_sent"] > plain["bytes_sent"]  # keys, commitments, shares, 2^64 ring


def test_dropouts_after_key_sharing_are_recovered(monkeypatch, capsys, files, tmp_path):
    extra = ("--secure-aggregation", "--dropout", "0.4", "--seed", "3")
    code, result, err = _simulate(monkeypatch, capsys, files, tmp_path, *extra)
    assert code == 0, err
    # 2 of 5 drop at the masked-input stage in each of the 3 rounds; the threshold 3 survives
    assert result["secure_aggregation"] == {"participants": 5, "dropped": 6, "recovered": 6}
    assert result["rounds"] == 3 and result["auc"] > 0.7
    code, again, _ = _simulate(monkeypatch, capsys, files, tmp_path, *extra)
    assert again["auc"] == result["auc"]  # --seed picks the same dropouts


def test_dp_secure_aggregation_and_int8_compose(monkeypatch, capsys, files, tmp_path):
    dp = ("--dp-noise", "0.5", "--dp-clip", "1.0", "--compress", "int8")
    code, result, err = _simulate(monkeypatch, capsys, files, tmp_path, "--secure-aggregation", *dp)
    assert code == 0, err
    assert result["noise_multiplier"] == 0.5 and result["sampling_rate"] == 1.0
    assert result["delta"] == 1e-5 and result["epsilon"] > 0
    assert result["secure_aggregation"] == {
        "participants": 5,
        "dropped": 0,
        "recovered": 0,
        "compression": {"scheme": "int8", "code_ring_bits": 16, "uncompressed_rounds": 1},
    }
    code, clear, _ = _simulate(monkeypatch, capsys, files, tmp_path, *dp)
    assert (clear["epsilon"], clear["noise_multiplier"]) == (result["epsilon"], 0.5)
    # 7 weights: keys, commitments and shares outweigh the codes saved at this size
    assert result["bytes_sent"] > clear["bytes_sent"]


def test_int8_and_int4_are_quantised_inside_the_ring(monkeypatch, capsys, files, tmp_path):
    code, secure, _ = _simulate(monkeypatch, capsys, files, tmp_path, "--secure-aggregation")
    assert code == 0
    for scheme, ring in (("int8", 16), ("int4", 8)):  # 5 x 255 < 2^16, 5 x 15 < 2^8
        extra = ("--secure-aggregation", "--compress", scheme)
        code, result, err = _simulate(monkeypatch, capsys, files, tmp_path, *extra)
        assert code == 0, err
        assert result["secure_aggregation"]["compression"]["code_ring_bits"] == ring
        assert abs(result["auc"] - secure["auc"]) <= 0.01


def test_dp_over_secure_aggregation_adds_noise_to_the_same_sum(
    monkeypatch, capsys, files, tmp_path
):
    # with (almost) no noise, DP-FedAvg over the unmasked sum is DP-FedAvg over the clear updates
    dp = ("--dp-noise", "1e-6", "--dp-clip", "0.5")
    code, clear, _ = _simulate(monkeypatch, capsys, files, tmp_path, *dp)
    code, secure, err = _simulate(monkeypatch, capsys, files, tmp_path, "--secure-aggregation", *dp)
    assert code == 0, err
    assert abs(secure["auc"] - clear["auc"]) <= 1e-3
    assert abs(secure["logloss"] - clear["logloss"]) <= 1e-3


@pytest.mark.parametrize(
    ("extra", "option"),
    [
        (("--dropout", "0.2"), "--dropout"),
        (("--secure-aggregation", "--dropout", "0.6"), "--dropout"),
        (("--secure-aggregation", "--dropout", "1.0"), "--dropout"),
        (("--secure-aggregation", "--aggregation", "median"), "--aggregation"),
        (("--secure-aggregation", "--model", "gbm", "--dropout", "0.2"), "--dropout"),
        (("--secure-aggregation", "--compress", "topk:3"), "--compress"),
    ],
)
def test_unsupported_combinations_are_refused(monkeypatch, capsys, files, tmp_path, extra, option):
    code, _, err = _simulate(monkeypatch, capsys, files, tmp_path, *extra)
    assert code == 2 and option in err


def test_gbm_histograms_through_secure_aggregation(monkeypatch, capsys, files, tmp_path):
    gbm = ("--model", "gbm", "--param", "max_depth=2", "--param", "max_bins=8")
    code, plain, err = _simulate(monkeypatch, capsys, files, tmp_path, *gbm)
    assert code == 0, err
    code, secure, err = _simulate(
        monkeypatch, capsys, files, tmp_path, *gbm, "--secure-aggregation"
    )
    assert code == 0, err
    assert secure["auc"] == plain["auc"] and secure["logloss"] == plain["logloss"]
    assert secure["secure_aggregation"] == {"participants": 5, "dropped": 0, "recovered": 0}
