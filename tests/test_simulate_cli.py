"""``cdp-fl simulate horizontal`` on non-IID CSV and Parquet party files, and ``cdp-fl models``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cdp_federated.registry import load_model, load_model_document
from tests.cli_helpers import run

BETA = np.array([1.0, -0.7, 0.4, 0.0])
# Non-IID: each party has its own feature shift, base rate and size.
SETUP = {"eu": (700, -0.6, -1.0, 11), "us": (1300, 0.8, 0.4, 12), "uk": (400, 0.1, -0.2, 13)}


def frame(n: int, shift: float, base: float, seed: int, prefix: str) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(shift, 1.0, size=(n, 4))
    churn = (rng.random(n) < 1 / (1 + np.exp(-(x @ BETA + base)))).astype(int)
    spend = x @ np.array([3.0, 1.0, 0.5, 0.0]) + rng.normal(0, 1.0, n) + 10.0
    return pl.DataFrame(
        {
            "profile_id": [f"{prefix}-{i}" for i in range(n)],
            "email": [f"{prefix}{i}@example.com" for i in range(n)],  # PII: never a feature
            "tenure": x[:, 0] * 12 + 30,
            "tickets": x[:, 1],
            "monthly_charges": x[:, 2] * 20 + 70,
            "noise": x[:, 3],
            "plan": ["basic"] * n,  # text: not a default feature
            "churn": churn,
            "spend": spend,
        }
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("parties")
    out = {}
    for name, (n, shift, base, seed) in SETUP.items():
        data = frame(n, shift, base, seed, name)
        if name == "us":
            out[name] = folder / f"{name}.parquet"
            data.write_parquet(out[name])
        else:
            out[name] = folder / f"{name}.csv"
            data.write_csv(out[name])
    out["test"] = folder / "test.csv"
    frame(900, 0.2, -0.2, 21, "test").write_csv(out["test"])
    return out


def party_args(files: dict[str, Path], names=("eu", "us", "uk")) -> list[str]:
    args = []
    for name in names:
        args += ["--party", f"{name}={files[name]}"]
    return args + ["--test", str(files["test"])]


def simulate(monkeypatch, capsys, files, registry, *extra):
    return run(
        monkeypatch,
        capsys,
        "simulate",
        "horizontal",
        *party_args(files),
        "--registry",
        str(registry),
        *extra,
    )


def test_logreg_matches_centralized_and_lands_in_the_registry(monkeypatch, capsys, files, tmp_path):
    code, out, err = simulate(
        monkeypatch, capsys, files, tmp_path, "--label", "churn", "--rounds", "25", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["command"] == "simulate horizontal" and result["status"] == "ok"
    assert result["features"] == ["tenure", "tickets", "monthly_charges", "noise", "spend"]
    assert result["rows_per_party"] == {"eu": 700, "us": 1300, "uk": 400}
    assert result["test_rows_per_party"] == {"test": 900}
    assert result["rounds"] == 25
    assert 0.65 < result["auc"] < 0.95
    assert abs(result["auc"] - result["centralized_auc"]) <= 0.005
    assert 0 < result["logloss"] < 0.7 and 0 <= result["ece"] < 0.1
    model = load_model(result["model_path"])
    assert list(model.feature_names_in_) == result["features"]
    doc = load_model_document(result["model_path"])
    assert doc["kind"] == "logreg" and doc["objective"] == "binary"
    assert doc["lineage"]["rows_per_party"] == result["rows_per_party"]
    assert doc["lineage"]["funnel"]["eu"] == {"rows_in": 700, "consented": None, "trained": 700}
    assert doc["lineage"]["metrics"]["auc"] == pytest.approx(result["auc"], abs=1e-4)
    assert len(doc["lineage"]["calibration"]) == 10
    assert Path(result["card_path"]).read_text().startswith("# Model card: simulate-logreg")


def test_linear_regression_matches_ridge(monkeypatch, capsys, files, tmp_path):
    code, out, err = simulate(
        monkeypatch,
        capsys,
        files,
        tmp_path,
        "--model",
        "linear",
        "--label",
        "spend",
        "--features",
        "tenure,tickets,monthly_charges,noise",
        "--rounds",
        "30",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert "auc" not in result and 0.8 < result["rmse"] < 1.3
    assert result["rmse"] == pytest.approx(result["centralized_rmse"], rel=1e-3)
    assert load_model_document(result["model_path"])["objective"] == "regression"


def test_a_server_strategy_and_its_parameter_reach_the_job(monkeypatch, capsys, files, tmp_path):
    args = ("--label", "churn", "--strategy", "fedprox", "--rounds", "10", "--json")
    code, _, err = simulate(monkeypatch, capsys, files, tmp_path, *args)
    assert code == 2 and "mu" in err  # fedprox without its proximal weight is refused
    code, out, err = simulate(monkeypatch, capsys, files, tmp_path, *args, "--param", "mu=0.01")
    assert code == 0, err
    params = load_model_document(json.loads(out)["model_path"])["lineage"]["params"]
    assert params["strategy"] == "fedprox" and params["mu"] == 0.01


def test_gbm_trains_and_is_compared_with_hist_gradient_boosting(
    monkeypatch, capsys, files, tmp_path
):
    code, out, err = simulate(
        monkeypatch,
        capsys,
        files,
        tmp_path,
        "--model",
        "gbm",
        "--label",
        "churn",
        "--rounds",
        "8",
        "--param",
        "max_depth=3",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["rounds"] == 8
    assert abs(result["auc"] - result["centralized_auc"]) < 0.03
    assert type(load_model(result["model_path"])).__name__ == "FederatedGBMClassifier"


def test_table_output_and_models_commands(monkeypatch, capsys, files, tmp_path):
    code, out, err = simulate(monkeypatch, capsys, files, tmp_path, "--label", "churn")
    assert code == 0, err
    assert "centralized scikit-learn" in out and "card:" in out
    code, out, _ = run(monkeypatch, capsys, "models", "list", "--registry", str(tmp_path), "--json")
    [entry] = json.loads(out)
    assert entry["verified"] and entry["name"] == "simulate-logreg-binary" and entry["version"] == 1
    ref = "simulate-logreg-binary@1"
    code, out, _ = run(
        monkeypatch, capsys, "models", "show", ref, "--registry", str(tmp_path), "--json"
    )
    shown = json.loads(out)
    assert code == 0 and shown["model_id"] == entry["model_id"] and "model" not in shown
    code, out, _ = run(
        monkeypatch, capsys, "models", "card", ref, "--registry", str(tmp_path), "--format", "json"
    )
    assert code == 0 and json.loads(out)["data"]["rows_per_party"]["uk"] == 400
    code, out, _ = run(monkeypatch, capsys, "models", "card", ref, "--registry", str(tmp_path))
    assert code == 0 and "## Parties and consent funnel" in out
    target = tmp_path / "exported" / "churn.json"
    code, out, _ = run(
        monkeypatch,
        capsys,
        "models",
        "export",
        ref,
        "--out",
        str(target),
        "--registry",
        str(tmp_path),
    )
    assert code == 0 and load_model(target).n_features_in_ == 5
    # Tampering shows up in `list` and stops `show`.
    path = Path(entry["path"])
    path.write_text(path.read_text().replace('"churn"', '"churned"'))
    code, out, _ = run(monkeypatch, capsys, "models", "list", "--registry", str(tmp_path), "--json")
    assert json.loads(out)[0]["verified"] is False
    code, _, err = run(
        monkeypatch, capsys, "models", "show", entry["model_id"], "--registry", str(tmp_path)
    )
    assert code == 2 and "content_sha256" in err


def test_mismatched_schemas_name_the_party_and_the_columns(monkeypatch, capsys, files, tmp_path):
    odd = tmp_path / "odd.csv"
    pl.read_csv(files["eu"]).drop("noise").rename({"tickets": "complaints"}).write_csv(odd)
    code, _, err = run(
        monkeypatch,
        capsys,
        "simulate",
        "horizontal",
        "--party",
        f"eu={files['eu']}",
        "--party",
        f"odd={odd}",
        "--test",
        str(files["test"]),
        "--label",
        "churn",
        "--registry",
        str(tmp_path),
    )
    assert code == 2
    assert (
        "party 'odd'" in err and "'noise'" in err and "'complaints'" in err and "'tickets'" in err
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--label", "churned"), "label column 'churned' not found"),
        (("--label", "churn", "--model", "forest"), "unknown model"),
        (("--label", "churn", "--features", "tenure,height"), "features not in every file"),
        (("--label", "churn", "--model", "gbm", "--strategy", "fedadam"), "linear models only"),
        (("--label", "spend"), "label 'spend' must be 0 or 1"),
        (("--label", "churn", "--objective", "regression"), "objective does not fit"),
    ],
    ids=["missing-label", "unknown-model", "unknown-feature", "gbm-strategy", "label", "objective"],
)
def test_bad_input_is_a_clear_error(monkeypatch, capsys, files, tmp_path, extra, expected):
    code, out, err = simulate(monkeypatch, capsys, files, tmp_path, *extra, "--rounds", "2")
    assert code == 2 and out == ""
    assert expected in err and err.startswith("error: ")


def test_a_bad_party_argument_or_file_type_is_refused(monkeypatch, capsys, files, tmp_path):
    code, _, err = run(
        monkeypatch, capsys, "simulate", "horizontal", "--party", "eu", "--label", "churn",
        "--test", str(files["test"]),
    )  # fmt: skip
    assert code == 2 and "NAME=PATH" in err
    code, _, err = run(
        monkeypatch, capsys, "simulate", "horizontal", "--party", "eu=data.xlsx", "--label",
        "churn", "--test", str(files["test"]),
    )  # fmt: skip
    assert code == 2 and ".csv or .parquet" in err


def test_files_without_an_id_column_use_row_numbers(monkeypatch, capsys, files, tmp_path):
    from connectors.frames import registered_frames

    plain = {}
    for name in ("eu", "us", "test"):
        source = files[name]
        data = (pl.read_parquet if source.suffix == ".parquet" else pl.read_csv)(source)
        plain[name] = tmp_path / f"noid-{source.name}"
        if source.suffix == ".parquet":
            data.drop("profile_id").write_parquet(plain[name])
        else:
            data.drop("profile_id").write_csv(plain[name])
    code, out, err = run(
        monkeypatch,
        capsys,
        "simulate",
        "horizontal",
        *party_args(plain, names=("eu", "us")),
        "--label",
        "churn",
        "--rounds",
        "5",
        "--registry",
        str(tmp_path / "models"),
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["rows_per_party"] == {"eu": 700, "us": 1300}
    assert not [f for f in registered_frames() if f.startswith("simulate-")]


def test_a_party_without_rows_stops_the_job_unless_fewer_may_train(
    monkeypatch, capsys, files, tmp_path
):
    empty = tmp_path / "empty.parquet"
    pl.read_csv(files["eu"]).head(0).write_parquet(empty)
    args = [
        "simulate", "horizontal", "--party", f"eu={files['eu']}", "--party", f"empty={empty}",
        "--test", str(files["test"]), "--label", "churn", "--rounds", "3",
        "--registry", str(tmp_path / "models"), "--json",
    ]  # fmt: skip
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 2 and "participant 'empty'" in err and "no training rows" in err
    code, out, err = run(monkeypatch, capsys, *args, "--param", "min_fit_participants=1")
    assert code == 0, err
    result = json.loads(out)
    assert result["rows_per_party"] == {"eu": 700, "empty": 0}
    assert result["funnel"]["empty"] == {"rows_in": 0, "consented": None, "trained": 0}
