"""`cdp-fl audit ...` commands: verify the tamper-evident audit log, list it, manage its key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError
from . import app
from .data import DbOption, JsonOption, _url

audit_app = typer.Typer(help="Verify the tamper-evident audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")

KeyOption = Annotated[
    Path | None,
    typer.Option(
        "--key",
        help="Ed25519 signing key file (default: setting audit_key, "
        "<data_dir>/keys/audit-ed25519.key).",
    ),
]
PublicKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--public-key", help="Verify with this public key (PEM from `cdp-fl audit export-key`)."
    ),
]
AnchorOption = Annotated[
    Path | None,
    typer.Option(
        "--anchor",
        help="Anchor file with the latest signed head (default: audit-head-<db>.json next to "
        "the key).",
    ),
]
StrictOption = Annotated[
    bool,
    typer.Option(
        "--strict", help="Fail on warnings too: unsigned tail, missing or stale anchor file."
    ),
]


def _payload_text(payload: object, width: int = 100) -> str:
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


@audit_app.command("verify")
def audit_verify(
    db: DbOption = None,
    key: KeyOption = None,
    public_key: PublicKeyOption = None,
    anchor: AnchorOption = None,
    strict: StrictOption = False,
    as_json: JsonOption = False,
) -> None:
    """Recompute the hash chain and check the signed heads; exit 1 when tampering is detected."""
    from ..governance.audit import AuditLog
    from ..governance.audit_keys import load_public_key
    from ..store import open_store

    if key is not None and public_key is not None:
        raise ConfigError(
            "give --key or --public-key, not both",
            field="--public-key",
            fix="verifying needs only the public key",
        )
    verifier = load_public_key(public_key if public_key is not None else key)
    store = open_store(_url(db))
    report = AuditLog(store, verifier, anchor_path=anchor).verify(strict=strict)
    if as_json:
        result = {"db": store.display_url, **report.to_dict()}
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        latest = report.latest_checkpoint
        signed = (
            f"latest signed head seq {latest.entry_seq} ({latest.signed_at.isoformat()}, "
            f"key {latest.key_id})"
            if latest is not None
            else "no signed head"
        )
        if report.ok:
            typer.echo(
                f"audit log OK: {report.entries:,} entries, {signed}, anchor {report.anchor_status}, "
                f"unsigned tail {report.unsigned_tail:,}"
            )
        else:
            where = f"first bad entry: seq {report.first_bad_seq}" if report.first_bad_seq else ""
            typer.echo(f"audit log TAMPERED: {where}{': ' if where else ''}{report.reason}")
            checked = (
                f"entries 1-{report.head_seq} verified" if report.head_seq else "no entry verified"
            )
            if latest is not None:
                checked += f", up to the signed head at seq {latest.entry_seq}"
            typer.echo(f"before the failure: {checked}")
        for warning in report.warnings:
            typer.echo(f"warning: {warning}", err=True)
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command("log")
def audit_log(
    db: DbOption = None,
    kind: Annotated[str | None, typer.Option(help="Only entries of this kind.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Newest entries to show.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """List the newest audit entries (oldest first); `cdp-fl audit verify` checks them."""
    from ..governance.audit import AuditLog
    from ..store import open_store

    store = open_store(_url(db))
    entries = AuditLog(store).recent(limit, kind=kind)
    if as_json:
        typer.echo(
            json.dumps(
                {"db": store.display_url, "entries": [e.to_dict() for e in entries]},
                indent=2,
                sort_keys=True,
                ensure_ascii=False,
            )
        )
        return
    out = Table("seq", "timestamp", "kind", "payload", title=f"audit log {store.display_url}")
    for entry in entries:
        out.add_row(
            str(entry.seq),
            entry.timestamp.isoformat(timespec="seconds"),
            entry.kind,
            _payload_text(entry.payload),
        )
    Console().print(out)


@audit_app.command("checkpoint")
def audit_checkpoint(
    db: DbOption = None, key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """Sign the current head of the chain (after checking the entries since the last one)."""
    from ..governance.audit import AuditLog

    log = AuditLog.open(_url(db), key_path=key)
    checkpoint = log.checkpoint()
    if as_json:
        result = {"checkpoint": checkpoint.to_dict(), "anchor_path": str(log.anchor_path)}
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    typer.echo(
        f"signed head seq {checkpoint.entry_seq} with key {checkpoint.key_id}; anchor: "
        f"{log.anchor_path}"
    )


@audit_app.command("init-key")
def audit_init_key(key: KeyOption = None) -> None:
    """Create the Ed25519 signing key (mode 0600, outside the database); keeps an existing one."""
    from ..governance.audit_keys import default_key_path, generate_key, load_signer

    path = key if key is not None else default_key_path()
    if path.exists():
        existing = load_signer(path)
        typer.echo(f"audit key exists: {path} (key id {existing.key_id})")
        return
    created = generate_key(path)
    typer.echo(f"created audit key {path} (key id {created.key_id})")
    typer.echo(
        "keep it outside the database and back it up; give verifiers `cdp-fl audit export-key`",
        err=True,
    )


@audit_app.command("export-key")
def audit_export_key(key: KeyOption = None) -> None:
    """Print the public key (PEM): all a verifier needs."""
    from ..governance.audit_keys import load_public_key

    typer.echo(load_public_key(key).public_pem(), nl=False)
