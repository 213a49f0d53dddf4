"""``cdp-fl demo``: the end-to-end scenario with a readable summary (or ``--json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import app


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder (replaced).")] = Path("demo-output"),
    seed: Annotated[int, typer.Option(help="Scenario seed.")] = 7,
    customers: Annotated[int, typer.Option(help="Customers across the three regions.")] = 6000,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 30,
    policy: Annotated[
        Path | None,
        typer.Option(help="Policy YAML each participant enforces (default: internal-regions)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON on stdout.")
    ] = False,
) -> None:
    """Three regional data centres of one retailer train a purchase-propensity model together."""
    from ..demo import run_demo

    err = Console(stderr=True)
    with err.status("starting") as status:
        result = run_demo(
            out,
            seed=seed,
            customers=customers,
            rounds=rounds,
            policy=policy,
            on_step=lambda m: status.update(m),
        )
    if as_json:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    console = Console()
    funnel = Table(title="Per participant: events in, consent funnel, training rows")
    for col in (
        "participant",
        "events",
        "applied",
        "dead-lettered",
        "duplicates",
        "profiles",
        "consented",
        "trained",
        "held out",
        "database",
    ):
        funnel.add_column(col, justify="left" if col in ("participant", "database") else "right")
    for name, f in result["funnel"].items():
        ing = result["ingest"][name]
        funnel.add_row(
            name,
            f"{ing['received']:,}",
            f"{ing['applied']:,}",
            f"{ing['dead_lettered']:,}",
            f"{ing['duplicates']:,}",
            f"{f['rows_in']:,}",
            f"{f['consented']:,}",
            f"{f['trained']:,}",
            f"{result['test_rows_per_party'][name]:,}",
            result["databases"][name],
        )
    console.print(funnel)
    scores = Table(title="Held-out customers")
    scores.add_column("model")
    scores.add_column("AUC", justify="right")
    scores.add_row("federated logistic regression (FedAvg)", f"{result['auc']:.4f}")
    scores.add_row("centralized scikit-learn, same rows", f"{result['centralized_auc']:.4f}")
    if result.get("gbm"):
        gbm = result["gbm"]
        scores.add_row(f"federated histogram GBM ({gbm['trees']} trees)", f"{gbm['auc']:.4f}")
        scores.add_row(
            "centralized HistGradientBoosting, same rows and parameters",
            f"{gbm['centralized_auc']:.4f}",
        )
    console.print(scores)
    console.print(
        f"gap {abs(result['auc'] - result['centralized_auc']):.4f} after {result['rounds']} rounds; "
        f"log loss {result['logloss']:.4f}; {result['seconds']:.1f}s\nmodel: {result['model_path']}"
        f"\nregistry id: {result['model_id']} (cdp-fl models show {result['model_id']} "
        f"--registry {out}/models)\nmodel card: {result['card_path']}"
    )
    if result.get("gbm"):
        console.print(
            f"GBM: {result['gbm']['seconds']:.1f}s; registry id {result['gbm']['model_id']}"
        )
    pol = result["policy"]
    first = next(iter(result["databases"]))
    console.print(
        f"policy {pol['name']} v{pol['version']} ({pol['hash'][:12]}) allowed the job at every "
        "participant; audit heads signed: "
        + ", ".join(f"{n} {a['entries']} entries" for n, a in result["audit"].items())
        + f"\nverify one: cdp-fl audit verify --db {result['databases'][first]} "
        f"--key {out}/keys/{first}-audit.key"
    )
