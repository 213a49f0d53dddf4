"""``cdp-fl``: the command-line interface (thin: each command calls the library)."""

from __future__ import annotations

import sys

import typer

from ..errors import CDPFederatedError

app = typer.Typer(
    name="cdp-fl",
    help="Federated learning for Customer Data Platforms: ingest events, check consent, train "
    "across parties without moving rows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from ..plugins import make_plugin_manager
    from . import (  # noqa: F401 - commands register on import
        align,
        audit,
        consent,
        consent_ledger,
        data,
        demo,
        identity,
        models,
        policy,
        runtime,
        simulate,
    )

    try:
        make_plugin_manager().hook.cdp_register_cli_commands(app=app)
    except CDPFederatedError as exc:
        typer.echo(f"warning: plugins not loaded: {exc}", err=True)


def main() -> None:
    """Console entry point. Typer runs standalone (usage errors exit 2 with its message,
    ``typer.Exit(n)`` exits ``n``); typed errors become one line on stderr and exit code 2."""
    _register()
    try:
        app()
    except CDPFederatedError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
