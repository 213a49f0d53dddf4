"""Data commands: db, ingest, features, dead-letters, connectors, plugins, settings."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ..errors import ConfigError
from ..results import make_result
from ..settings import SETTINGS, default_db_url, normalize_db_url
from . import app

console = Console(stderr=True, soft_wrap=True)
DbOption = Annotated[
    str | None, typer.Option("--db", envvar="CDP_FL_DB", help="SQLAlchemy URL or SQLite path.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]

db_app = typer.Typer(help="Create and inspect the local store.", no_args_is_help=True)
features_app = typer.Typer(help="Derive per-profile features from events.", no_args_is_help=True)
connectors_app = typer.Typer(help="List and preview data sources.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(features_app, name="features")
app.add_typer(connectors_app, name="connectors")


def _url(db: str | None) -> str:
    return normalize_db_url(db) if db else default_db_url()


def _parse_as_of(as_of: str | None) -> datetime:
    if not as_of:
        return datetime.now(UTC)
    try:
        value = datetime.fromisoformat(as_of)
    except ValueError:
        raise ConfigError(
            "--as-of is not ISO 8601", field="--as-of", value=as_of, fix="e.g. 2026-09-01T00:00:00Z"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2, sort_keys=True, default=str))


@db_app.command("init")
def db_init(
    db: DbOption = None,
    tcf_vendors: Annotated[
        str | None,
        typer.Option(
            "--tcf-vendors",
            help="IAB vendor ids whose TCF consent this ledger records at ingest, e.g. 755,1234.",
        ),
    ] = None,
) -> None:
    """Create the schema (explicit and versioned); safe to run twice."""
    from ..settings import parse_int_list
    from ..store import SCHEMA_VERSION, TCF_VENDORS_META, open_store

    store = open_store(_url(db), create=True)
    if tcf_vendors is not None:
        ids = parse_int_list(tcf_vendors, field="--tcf-vendors")
        store.set_meta(TCF_VENDORS_META, ",".join(map(str, ids)))
    vendors = ", ".join(map(str, store.tcf_vendor_ids)) or "none"
    console.print(
        f"schema version {SCHEMA_VERSION} ready at {store.display_url}; TCF vendors recorded: {vendors}"
    )


@db_app.command("info")
def db_info(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Row counts per table."""
    from sqlalchemy import func, select

    from ..store import open_store, schema

    store = open_store(_url(db))
    tables = [
        schema.profiles,
        schema.identifiers,
        schema.events,
        schema.consent_records,
        schema.dead_letters,
        schema.profile_features,
        schema.profile_labels,
        schema.models,
    ]
    counts = {}
    with store.engine.connect() as conn:
        for table in tables:
            counts[table.name] = conn.execute(select(func.count()).select_from(table)).scalar_one()
    if as_json:
        typer.echo(json.dumps({"db": store.display_url, "tables": counts}, indent=2))
        return
    out = Table("table", "rows", title=store.display_url)
    for name, n in counts.items():
        out.add_row(name, f"{n:,}")
    Console().print(out)


@app.command()
def ingest(
    path: Annotated[str, typer.Argument(help="Segment JSONL file, or - for standard input.")],
    db: DbOption = None,
    batch_size: Annotated[int | None, typer.Option(help="Events per transaction.")] = None,
    as_of: Annotated[
        str | None, typer.Option(help="Features as of this ISO time (default now).")
    ] = None,
    skip_features: Annotated[
        bool, typer.Option("--skip-features", help="Do not refresh features.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Validate, de-duplicate and apply Segment-spec events; bad ones go to the dead-letter table."""
    from ..features import build_features
    from ..host import Host
    from ..plugins import make_plugin_manager
    from ..store import open_store

    handle = Host.open_events(path)  # fail on an unreadable file before touching the store
    store = open_store(_url(db), create=True)
    host = Host(store, make_plugin_manager(), batch_size=batch_size)
    started = time.perf_counter()
    total = Path(path).stat().st_size if path != "-" and Path(path).is_file() else None
    columns = [BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(
        "[progress.description]{task.description}", *columns, console=console, disable=as_json
    ) as bar:
        task = bar.add_task("ingesting", total=total)
        with handle:
            stats = host.ingest_stream(
                handle, source=path, on_progress=lambda n: bar.advance(task, n)
            )
    profiles = None if skip_features else build_features(store, _parse_as_of(as_of))
    seconds = time.perf_counter() - started
    result = make_result(
        command="ingest",
        status="ok",
        received=stats.received,
        applied=stats.applied,
        duplicates=stats.duplicates,
        dead_lettered=stats.dead_lettered,
        profiles=profiles,
        seconds=round(seconds, 3),
        events_per_second=round(stats.received / seconds, 1) if seconds else None,
        databases={"local": store.display_url},
    )
    if as_json:
        _emit(result, True)
    else:
        console.print(
            f"received {stats.received:,}  applied {stats.applied:,}  duplicates {stats.duplicates:,}  "
            f"dead-lettered {stats.dead_lettered:,}  in {seconds:.1f}s ({result['events_per_second']:,} events/s)"
        )
        if stats.dead_lettered:
            console.print(f"see them with: cdp-fl dead-letters --db {store.display_url}")


@app.command("dead-letters")
def dead_letters(
    db: DbOption = None,
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Show dead-lettered events with their reasons."""
    from sqlalchemy import func, select

    from ..store import open_store, schema

    store = open_store(_url(db))
    t = schema.dead_letters
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(t.c.source, t.c.line_no, t.c.code, t.c.reason).order_by(t.c.id).limit(limit)
        ).all()
        counts = dict(conn.execute(select(t.c.code, func.count()).group_by(t.c.code)).all())
    if as_json:
        typer.echo(
            json.dumps({"counts": counts, "rows": [dict(r._mapping) for r in rows]}, indent=2)
        )
        return
    out = Table("source", "line", "code", "reason", title=f"dead letters ({sum(counts.values())})")
    for r in rows:
        out.add_row(str(r.source), str(r.line_no), r.code, r.reason)
    Console().print(out)


@features_app.command("build")
def features_build(
    db: DbOption = None,
    as_of: Annotated[str | None, typer.Option(help="ISO time; default now.")] = None,
    label_window_days: Annotated[
        int | None, typer.Option(help="Also build label 'purchased_<N>d'.")
    ] = None,
) -> None:
    """Recompute profile features (and optionally a purchase label) from stored events."""
    from ..features import build_features, build_labels, read_events
    from ..store import open_store

    when = _parse_as_of(as_of)
    store = open_store(_url(db))
    events = read_events(store).collect().lazy()
    n = build_features(store, when, events=events)
    console.print(f"{n:,} profiles with features as of {when.isoformat()}")
    if label_window_days:
        name = f"purchased_{label_window_days}d"
        m = build_labels(store, when, name=name, window_days=label_window_days, events=events)
        console.print(f"{m:,} profiles labelled {name}")


@connectors_app.command("list")
def connectors_list() -> None:
    """Connector types registered by installed plugins."""
    from ..connector import ConnectorRegistry
    from ..plugins import make_plugin_manager

    for name in ConnectorRegistry(make_plugin_manager()).types:
        typer.echo(name)


@connectors_app.command("preview")
def connectors_preview(
    sources: Annotated[Path, typer.Argument(help="YAML file declaring sources.")],
    name: Annotated[str | None, typer.Option(help="Source to preview (default: all).")] = None,
    rows: Annotated[int, typer.Option(help="Rows to show.")] = 5,
) -> None:
    """Read declared sources through their connectors and show the schema and first rows."""
    from ..connector import ConnectorRegistry, load_connector_configs
    from ..plugins import make_plugin_manager

    registry = ConnectorRegistry(make_plugin_manager())
    for config in load_connector_configs(sources):
        if name and config.name != name:
            continue
        frame = registry.open(config).scan().head(rows).collect()
        typer.echo(f"# {config.name} ({config.type})")
        typer.echo(str(frame))


@app.command()
def plugins(as_json: JsonOption = False) -> None:
    """Registered plugins and the hooks each implements."""
    from ..plugins import make_plugin_manager, plugin_names

    listing = plugin_names(make_plugin_manager())
    if as_json:
        typer.echo(json.dumps(listing, indent=2))
        return
    for item in listing:
        typer.echo(f"{item['name']}: {', '.join(item['hooks'])}")


@app.command()
def settings() -> None:
    """Settings, their environment variables and defaults."""
    out = Table("setting", "environment", "default", "help")
    for s in SETTINGS:
        out.add_row(s.name, s.env, str(s.default), s.help)
    Console().print(out)
