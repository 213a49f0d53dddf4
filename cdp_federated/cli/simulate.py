"""``cdp-fl simulate horizontal``: in-process participants on local party files (see simulate.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError
from . import app
from .data import JsonOption

simulate_app = typer.Typer(
    help="Simulate a federation on local files, with a centralized baseline.", no_args_is_help=True
)
app.add_typer(simulate_app, name="simulate")


def _params(values: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` job parameters; VALUE is read as JSON (numbers, true/false) or kept as text."""
    params: dict[str, Any] = {}
    for value in values or []:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise ConfigError(
                "a parameter is KEY=VALUE", field="--param", value=value, fix="e.g. --param mu=0.01"
            )
        try:
            params[key] = json.loads(text)
        except ValueError:
            params[key] = text
    return params


def _parties(values: list[str]) -> dict[str, Path]:
    parties: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(
                "a party is NAME=PATH", field="--party", value=value, fix="e.g. --party eu=eu.csv"
            )
        if name in parties:
            raise ConfigError("party named twice", field="--party", value=name, fix="rename one")
        parties[name] = Path(path)
    return parties


@simulate_app.command("horizontal")
def simulate_horizontal_command(
    party: Annotated[
        list[str], typer.Option("--party", help="NAME=PATH of a party's CSV or Parquet file.")
    ],
    label: Annotated[str, typer.Option("--label", help="Label column.")],
    test: Annotated[Path, typer.Option("--test", help="Test file (same columns), scored locally.")],
    model: Annotated[str, typer.Option("--model", help="logreg, linear or gbm.")] = "logreg",
    objective: Annotated[
        str | None, typer.Option("--objective", help="binary or regression (default: by model).")
    ] = None,
    features: Annotated[
        str | None,
        typer.Option("--features", help="a,b,c (default: numeric columns but label, id, PII)."),
    ] = None,
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds (trees for gbm).")] = 20,
    strategy: Annotated[
        str, typer.Option("--strategy", help="fedavg, fedprox, fedavgm, fedadam or fedyogi.")
    ] = "fedavg",
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for sampling/draws.")] = None,
    id_column: Annotated[
        str, typer.Option("--id-column", help="Row id column (row numbers when absent).")
    ] = "profile_id",
    registry: Annotated[
        Path | None,
        typer.Option(
            "--registry", help="Registry folder for the model (default <data_dir>/models)."
        ),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            help="KEY=VALUE job parameter, repeatable: C, mu (fedprox), server_learning_rate, "
            "max_depth, learning_rate, lambda, max_bins (gbm)...",
        ),
    ] = None,
    compress: Annotated[
        str,
        typer.Option(
            "--compress",
            help="Update compression: none, int8, int4 or topk:K (K a count or a fraction). "
            "With --secure-aggregation, int8/int4 codes are summed inside a narrow masked ring "
            "(2^16 for up to 257 parties at int8); top-k is refused.",
        ),
    ] = "none",
    aggregation: Annotated[
        str,
        typer.Option(
            "--aggregation",
            help="mean (FedAvg), median or trimmed_mean (--param trim_fraction=0.1); "
            "--param norm_bound=B clips each update.",
        ),
    ] = "mean",
    dp_epsilon: Annotated[
        float | None,
        typer.Option(
            "--dp-epsilon", help="Client-level DP: target epsilon of the job (noise calibrated)."
        ),
    ] = None,
    dp_delta: Annotated[
        float | None, typer.Option("--dp-delta", help="DP delta (default 1e-5).")
    ] = None,
    dp_noise: Annotated[
        float | None,
        typer.Option("--dp-noise", help="DP noise multiplier, instead of --dp-epsilon."),
    ] = None,
    dp_clip: Annotated[
        float | None,
        typer.Option("--dp-clip", help="L2 clip of each party's update (default 1.0)."),
    ] = None,
    secure_aggregation: Annotated[
        bool,
        typer.Option(
            "--secure-aggregation",
            help="Mask updates (pairwise X25519 masks, Shamir shares): the coordinator sees "
            "only each round's sum.",
        ),
    ] = False,
    dropout: Annotated[
        float,
        typer.Option(
            "--dropout",
            help="With --secure-aggregation: fraction of participants that drop after key "
            "sharing in every round (simulated; chosen by --seed or at random).",
        ),
    ] = 0.0,
    as_json: JsonOption = False,
) -> None:
    """Train one model across party files in-process; compare with scikit-learn on pooled rows."""
    from ..settings import data_dir
    from ..simulate import simulate_horizontal

    chosen = [f.strip() for f in features.split(",") if f.strip()] if features else None
    result = simulate_horizontal(
        _parties(party),
        label=label,
        test=test,
        registry_root=registry if registry is not None else data_dir() / "models",
        model=model,
        objective=objective,
        features=chosen,
        rounds=rounds,
        strategy=strategy,
        seed=seed,
        id_column=id_column,
        params=_params(param),
        compress=compress,
        aggregation=aggregation,
        dp_epsilon=dp_epsilon,
        dp_delta=dp_delta,
        dp_noise=dp_noise,
        dp_clip=dp_clip,
        secure_aggregation=secure_aggregation,
        dropout=dropout,
    )
    if as_json:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    console = Console()
    rows = Table(title="Training rows per party")
    rows.add_column("party")
    rows.add_column("rows", justify="right")
    for name, n in result["rows_per_party"].items():
        rows.add_row(name, f"{n:,}")
    console.print(rows)
    scores = Table(title=f"Test file ({result['test_rows_per_party']['test']:,} rows)")
    scores.add_column("model")
    binary = "auc" in result
    scores.add_column("AUC" if binary else "RMSE", justify="right")
    scores.add_row(f"federated {model} ({strategy})", f"{result['auc' if binary else 'rmse']:.4f}")
    central = result["centralized_auc" if binary else "centralized_rmse"]
    scores.add_row("centralized scikit-learn, pooled rows", f"{central:.4f}")
    console.print(scores)
    extra = f"log loss {result['logloss']:.4f}, ECE {result['ece']:.4f}; " if binary else ""
    console.print(
        f"{extra}{result['rounds']} rounds, {result['seconds']:.1f}s, "
        f"{result['bytes_sent']:,} bytes of updates sent\n"
        f"model: {result['model_path']}\ncard: {result['card_path']}"
    )


def _named_files(values: list[str], option: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(
                "a party is NAME=PATH",
                field=option,
                value=value,
                fix=f"e.g. {option} shop=shop.csv",
            )
        if name in files:
            raise ConfigError("party named twice", field=option, value=name, fix="rename one")
        files[name] = Path(path)
    return files


def _vertical_model(model: str, objective: str | None) -> tuple[str, str]:
    """The issue's names for the vertical models: ``gbm`` is SecureBoost; ``linear`` is the
    vertical linear model, i.e. ``logreg`` with the regression objective."""
    if model == "gbm":
        return "secureboost", objective or "binary"
    if model == "linear":
        if objective not in (None, "regression"):
            raise ConfigError(
                "--model linear is a regression model",
                field="--objective",
                value=objective,
                fix="drop --objective, or use --model logreg for a binary label",
            )
        return "logreg", "regression"
    return model, objective or "binary"


@simulate_app.command("vertical")
def simulate_vertical_command(
    party: Annotated[
        list[str], typer.Option("--party", help="NAME=PATH: a party's training file (its columns).")
    ],
    key: Annotated[str, typer.Option("--key", help="Identifier column matched across parties.")],
    label: Annotated[str, typer.Option("--label", help="Label column (label party only).")],
    label_party: Annotated[
        str, typer.Option("--label-party", help="The active party: holds the label and HE key.")
    ],
    test_party: Annotated[
        list[str], typer.Option("--test-party", help="NAME=PATH: a party's test file.")
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="secureboost (or gbm), logreg, or linear (logreg's regression objective).",
        ),
    ] = "secureboost",
    objective: Annotated[
        str | None,
        typer.Option("--objective", help="binary or regression (linear: regression)."),
    ] = None,
    align_method: Annotated[
        str, typer.Option("--align", help="psi (across organisations) or salted-hash.")
    ] = "psi",
    he: Annotated[str, typer.Option("--he", help="paillier (default) or ou (read the caveat).")] = (
        "paillier"
    ),
    trees: Annotated[
        int, typer.Option("--trees", help="Boosting rounds (epochs with --model logreg).")
    ] = 10,
    depth: Annotated[int, typer.Option("--depth", help="Tree depth.")] = 5,
    learning_rate: Annotated[float, typer.Option("--learning-rate")] = 0.3,
    max_bins: Annotated[int, typer.Option("--max-bins", help="Bins per feature (2-127).")] = 32,
    reg_lambda: Annotated[float, typer.Option("--lambda", help="L2 on leaf weights.")] = 1.0,
    kind: Annotated[
        str, typer.Option("--kind", help="Identifier kind: email, phone, device_id, customer_id.")
    ] = "email",
    scheme: Annotated[str, typer.Option("--scheme", help="Normalisation: uid2, google, meta.")] = (
        "uid2"
    ),
    region: Annotated[
        str | None, typer.Option("--region", help="Default phone region (phones without +cc).")
    ] = None,
    he_workers: Annotated[
        int,
        typer.Option(
            "--he-workers",
            help="Processes per party for HE encryption and bucket sums (2 pays off from about "
            "50k rows; starting them costs about a second).",
        ),
    ] = 1,
    insecure_test_keys: Annotated[
        bool,
        typer.Option("--insecure-test-keys", hidden=True, help="1024-bit HE keys (tests only)."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Align party files by PSI, train SecureBoost over the sealed relay in-process; compare with
    scikit-learn on the joined rows and with the label party alone."""
    from ..simulate_vertical import VerticalSettings, native_stdout_to_stderr, simulate_vertical

    model, objective = _vertical_model(model, objective)
    settings = VerticalSettings(
        model=model,
        objective=objective,
        trees=trees,
        depth=depth,
        learning_rate=learning_rate,
        max_bins=max_bins,
        reg_lambda=reg_lambda,
        he=he,
        key_bits=1024 if insecure_test_keys else 2048,
        insecure_keys=insecure_test_keys,
        he_workers=he_workers,
    )
    with native_stdout_to_stderr():
        result = simulate_vertical(
            _named_files(party, "--party"),
            key=key,
            label=label,
            label_party=label_party,
            test_parties=_named_files(test_party, "--test-party"),
            align=align_method,
            settings=settings,
            kind=kind,
            scheme=scheme,
            region=region,
        )
    if as_json:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    metric = "auc" if "auc" in result else "rmse"
    table = Table(title=f"Aligned test rows: {result['test_intersection_size']:,}")
    table.add_column("model")
    table.add_column(metric.upper(), justify="right")
    table.add_row(f"federated {model} ({result['he']})", f"{result[metric]:.4f}")
    table.add_row("centralized scikit-learn, joined rows", f"{result['centralized_' + metric]:.4f}")
    table.add_row(f"{label_party} alone", f"{result['label_party_only_' + metric]:.4f}")
    console = Console()
    console.print(table)
    console.print(
        f"{result['method']}: {result['intersection_size']:,} training customers aligned; "
        f"{result['rounds']} trees, {result['bytes_exchanged']:,} relay bytes, "
        f"{result['seconds']:.1f}s"
    )
