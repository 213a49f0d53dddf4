"""`cdp-fl identity ...` commands."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated

import typer

from . import app
from .data import JsonOption

identity_app = typer.Typer(
    help="Normalise and hash identifiers the way the industry does.", no_args_is_help=True
)
app.add_typer(identity_app, name="identity")


class KindChoice(StrEnum):
    email = "email"
    phone = "phone"
    device_id = "device_id"
    customer_id = "customer_id"


class SchemeChoice(StrEnum):
    uid2 = "uid2"
    google = "google"
    meta = "meta"


@identity_app.command("normalize")
def identity_normalize(
    value: Annotated[str, typer.Argument(help="The identifier, e.g. 'Jane.Doe+work@gmail.com'.")],
    kind: Annotated[KindChoice, typer.Option("--kind", help="What the value is.")],
    scheme: Annotated[
        SchemeChoice,
        typer.Option(
            "--scheme",
            help="Normalisation rules: uid2 (UID2), google (Google Ads / Data Manager), "
            "meta (Meta Conversions API).",
        ),
    ],
    region: Annotated[
        str | None,
        typer.Option(
            "--region", help="Default phone region (ISO 3166-1 alpha-2) for numbers without +."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Print the normalised value and its SHA-256 (hex and base64); exit 2 if it is invalid."""
    from ..identity.normalize import hash_normalized, normalize_one

    normalized = normalize_one(value, kind=kind.value, scheme=scheme.value, default_region=region)
    result = hash_normalized(normalized, scheme.value)
    if as_json:
        typer.echo(json.dumps(result, indent=2, sort_keys=True, ensure_ascii=False))
        return
    preferred = "sha256_b64" if scheme is SchemeChoice.uid2 else "sha256_hex"
    for key in ("normalized", "sha256_hex", "sha256_b64"):
        marker = f"  ({scheme.value} sends this)" if key == preferred else ""
        typer.echo(f"{key}: {result[key]}{marker}")
