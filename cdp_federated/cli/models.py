"""``cdp-fl models ...``: browse the model registry, print model cards, export a verified model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError
from . import app
from .data import JsonOption

models_app = typer.Typer(help="Browse the model registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")

RegistryOption = Annotated[
    Path | None,
    typer.Option(
        "--registry",
        help="Registry folder (default: <data_dir>/models; the demo writes <out>/models).",
    ),
]
IdArgument = Annotated[str, typer.Argument(help="Model id, NAME@VERSION or NAME (latest).")]


def _root(registry: Path | None) -> Path:
    if registry is not None:
        return registry
    from ..settings import data_dir

    return data_dir() / "models"


def _metric_text(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, int | float))


@models_app.command("list")
def models_list(registry: RegistryOption = None, as_json: JsonOption = False) -> None:
    """Every model in the registry, verified (a tampered one is flagged, not hidden)."""
    from ..registry import list_models

    entries = list_models(_root(registry))
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in entries], indent=2, sort_keys=True))
        return
    table = Table(title=f"Models in {_root(registry)}")
    for col in ("model id", "name", "version", "kind", "created", "metrics", "verified"):
        table.add_column(col)
    for e in entries:
        table.add_row(
            e.model_id,
            e.name or "-",
            str(e.version or "-"),
            f"{e.kind} ({e.objective})" if e.kind else "-",
            e.created_at or "-",
            _metric_text(dict(e.metrics or {})),
            "yes" if e.problem is None else f"NO: {e.problem}",
        )
    Console().print(table)


@models_app.command("show")
def models_show(
    model: IdArgument, registry: RegistryOption = None, as_json: JsonOption = False
) -> None:
    """One model's registry entry and lineage (verified before it is shown)."""
    from ..registry import load_model_document, resolve_model

    path = resolve_model(_root(registry), model)
    doc = load_model_document(path)
    summary = {k: v for k, v in doc.items() if k != "model"}
    summary["path"] = str(path)
    summary["features"] = doc["model"].get("feature_names_in", [])
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    console = Console()
    console.print(f"[bold]{doc['name']} v{doc['version']}[/bold]  {doc['model_id']}  ({path})")
    console.print(f"{doc['kind']} ({doc['objective']}), created {doc['created_at']}")
    console.print(f"content sha256 {doc['content_sha256']} (verified)")
    lineage = doc["lineage"]
    table = Table(title="Lineage")
    table.add_column("field")
    table.add_column("value")
    for key in sorted(lineage):
        value = lineage[key]
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        table.add_row(key, text if len(text) <= 200 else text[:197] + "...")
    console.print(table)


@models_app.command("card")
def models_card(
    model: IdArgument,
    registry: RegistryOption = None,
    fmt: Annotated[str, typer.Option("--format", help="md or json.")] = "md",
) -> None:
    """The model card, rendered from the verified model document."""
    from ..registry import load_model_document, resolve_model
    from ..registry_card import build_card, card_markdown

    if fmt not in ("md", "json"):
        raise ConfigError("unknown card format", field="--format", value=fmt, fix="use md or json")
    card = build_card(load_model_document(resolve_model(_root(registry), model)))
    if fmt == "json":
        typer.echo(json.dumps(card, indent=2, sort_keys=True))
    else:
        typer.echo(card_markdown(card))


@models_app.command("export")
def models_export(
    model: IdArgument,
    out: Annotated[Path, typer.Option("--out", help="Destination model.json file.")],
    registry: RegistryOption = None,
) -> None:
    """Copy a model's verified ``model.json`` to ``--out`` (load it with registry.load_model)."""
    from ..registry import load_model, resolve_model

    path = resolve_model(_root(registry), model)
    load_model(path)  # verified and loadable before anything is written
    if out.is_dir():
        out = out / "model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, out)
    typer.echo(str(out))
