"""Settings table: every tunable, its default, its environment variable and its help text.

The README's settings section and the CLI's ``--help`` are both generated from :data:`SETTINGS`,
and a test checks the docs list every one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["Setting", "SETTINGS", "get_setting", "data_dir", "default_db_url", "normalize_db_url"]


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str

    @property
    def env(self) -> str:
        return "CDP_FL_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "data_dir",
        "~/.local/share/cdp-federated",
        "Directory for the default SQLite store, models and demo output.",
    ),
    Setting(
        "db",
        None,
        "SQLAlchemy URL (or bare SQLite path) of the local store; default: <data_dir>/cdp.sqlite.",
    ),
    Setting(
        "batch_size", 5000, "Events per ingest transaction; a batch is written whole or not at all."
    ),
    Setting(
        "max_event_bytes",
        32768,
        "Largest accepted event (bytes of JSON); larger ones are dead-lettered (Segment's own limit is 32 KB).",
    ),
    Setting(
        "max_clock_skew_days",
        1,
        "Events stamped further than this in the future are dead-lettered.",
    ),
    Setting("trace_hooks", False, "Log every hook call with its arguments' types and duration."),
    Setting(
        "audit_key",
        None,
        "Ed25519 key file signing the audit chain's head, kept outside the database (anchor files "
        "go next to it); default: <data_dir>/keys/audit-ed25519.key.",
    ),
    Setting(
        "tcf_vendor_ids",
        "",
        "Comma-separated IAB vendor ids whose TCF consent is recorded in the ledger at ingest "
        "(a policy's tcf.vendor_id must be among them for TC strings to grant).",
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def parse_int_list(text: str, *, field: str) -> tuple[int, ...]:
    """``"755, 1234"`` -> ``(755, 1234)``; duplicates dropped, order kept."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"{field} must be comma-separated integers",
            field=field,
            value=text,
            fix="e.g. 755,1234",
        ) from None
    return tuple(dict.fromkeys(values))


def get_setting(name: str) -> Any:
    """Return the setting's value from its environment variable, else its default."""
    try:
        setting = _BY_NAME[name]
    except KeyError:
        raise ConfigError(
            "unknown setting", field="name", value=name, fix=f"use one of {sorted(_BY_NAME)}"
        ) from None
    raw = os.environ.get(setting.env)
    if raw is None or raw == "":
        return setting.default
    if isinstance(setting.default, bool):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(setting.default, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(
                "setting must be an integer", field=setting.env, value=raw, fix="set a whole number"
            ) from None
    return raw


def data_dir() -> Path:
    path = Path(os.path.expanduser(str(get_setting("data_dir"))))
    path.mkdir(parents=True, exist_ok=True)
    return path


def normalize_db_url(db: str | os.PathLike[str]) -> str:
    """``--db`` takes a SQLAlchemy URL everywhere; a bare path means a SQLite file."""
    text = str(db)
    if "://" in text:
        return text
    return "sqlite:///" + str(Path(text).expanduser().resolve())


def default_db_url() -> str:
    configured = get_setting("db")
    if configured:
        return normalize_db_url(configured)
    return normalize_db_url(data_dir() / "cdp.sqlite")
