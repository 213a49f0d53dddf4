"""`cdp-fl consent ...` commands."""

from __future__ import annotations

import typer

from . import app

consent_app = typer.Typer(
    help="Inspect and import consent signals; decode IAB TCF strings.", no_args_is_help=True
)
app.add_typer(consent_app, name="consent")
