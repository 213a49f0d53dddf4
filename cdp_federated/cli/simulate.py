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
        f"{extra}{result['rounds']} rounds, {result['seconds']:.1f}s\n"
        f"model: {result['model_path']}\ncard: {result['card_path']}"
    )
