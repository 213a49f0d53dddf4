"""`cdp-fl policy ...` commands."""

from __future__ import annotations

import typer

from . import app

policy_app = typer.Typer(
    help="Check governance policies and jobs against them.", no_args_is_help=True
)
app.add_typer(policy_app, name="policy")
