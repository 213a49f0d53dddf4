"""``cdp-fl consent import`` and ``cdp-fl consent status``: the ledger from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError
from ..results import make_result
from .consent import consent_app
from .data import DbOption, JsonOption, _emit, _parse_as_of, _url

PolicyOption = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        help="Policy YAML whose consent rules apply (default: the store's active policy, else built-in).",
    ),
]


@consent_app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="Segment JSONL events, or a CSV of signals.")],
    db: DbOption = None,
    tcf_vendors: Annotated[
        str | None,
        typer.Option(
            help="Vendor ids whose TCF consent is recorded (default: the store's, see db init)."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Import consent signals: events go through the full ingest (dead letters included); a CSV
    (profile_id, signal, granted, timestamp[, jurisdiction, tc_string]) is imported all or nothing."""
    from ..consent.imports import import_signals_csv
    from ..settings import parse_int_list
    from ..store import open_store

    if path.suffix.lower() == ".csv":
        store = open_store(_url(db), create=True)
        vendors = (
            parse_int_list(tcf_vendors, field="--tcf-vendors")
            if tcf_vendors is not None
            else store.tcf_vendor_ids
        )
        stats = import_signals_csv(store, path, vendor_ids=vendors)
        result = make_result(command="consent import", status="ok", **stats.to_dict())
    else:
        from ..host import Host

        if tcf_vendors is not None:
            raise ConfigError(
                "--tcf-vendors applies to CSV imports; events use the ledger's configured vendors",
                field="--tcf-vendors",
                value=tcf_vendors,
                fix="run `cdp-fl db init --tcf-vendors IDS` once, then import the events",
            )
        from ..plugins import make_plugin_manager

        handle = Host.open_events(str(path))
        store = open_store(_url(db), create=True)
        with handle:
            stats = Host(store, make_plugin_manager()).ingest_stream(handle, source=str(path))
        result = make_result(command="consent import", status="ok", **stats.to_dict())
    store.dispose()
    if as_json:
        _emit(result, True)
        return
    Console(stderr=True).print(
        ", ".join(f"{k}: {v}" for k, v in result.items() if isinstance(v, int))
    )


@consent_app.command("status")
def status(
    profile: Annotated[str, typer.Argument(help="Profile id (the CDP's userId).")],
    purpose: Annotated[str, typer.Option("--purpose", help="Job purpose, e.g. model_training.")],
    db: DbOption = None,
    policy: PolicyOption = None,
    at: Annotated[str | None, typer.Option("--at", help="ISO time (default now).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Whether a profile's consent allows a purpose, with the deciding signals as evidence."""
    from ..consent.active import active_rule
    from ..consent.status import consent_status
    from ..store import open_store

    store = open_store(_url(db))
    if policy is not None:
        from ..governance.policy import load_policy

        rule = load_policy(policy).purpose_rule(purpose)
    else:
        rule = active_rule(store, purpose)  # the store's active policy, else the built-in rules
        if rule is None:
            raise ConfigError(
                "the store's active policy does not permit this purpose",
                field="--purpose",
                value=purpose,
                fix="use a purpose the policy allows (cdp-fl policy check shows them)",
            )
    report = consent_status(store, profile, rule, _parse_as_of(at))
    store.dispose()
    if as_json:
        _emit(report, True)
    else:
        verdict = "[green]allowed[/green]" if report["allowed"] else "[red]denied[/red]"
        console = Console()
        console.print(
            f"{profile} / {purpose}: {verdict} - {report['reason']} "
            f"(jurisdiction {report['jurisdiction'] or 'unknown'})"
        )
        if report["signals"]:
            table = Table("signal", "granted", "timestamp", "evidence")
            for s in report["signals"]:
                table.add_row(s["signal"], str(s["granted"]), s["timestamp"], s["evidence"][:60])
            console.print(table)
    raise typer.Exit(0 if report["allowed"] else 1)
