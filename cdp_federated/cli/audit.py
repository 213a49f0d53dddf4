"""`cdp-fl audit ...` commands."""

from __future__ import annotations

import typer

from . import app

audit_app = typer.Typer(help="Verify the tamper-evident audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
