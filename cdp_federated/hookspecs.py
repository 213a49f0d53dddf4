"""The plugin contract: every hook a CDP host calls and every hook a plugin may implement.

Hooks are grouped by lifecycle. Each docstring says when the hook is called, with what, and how the
results of several implementations combine. Built-in features (the store writer, the first-party
connectors, the scorer) are plugins implementing these same hooks.

Implement a hook with ``@cdp_federated.hookimpl`` in a module or class and register it through the
``cdp_federated`` entry-point group. Arguments may be omitted from an implementation's signature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import polars as pl
    import typer
    from sqlalchemy import Connection

    from .connector import Connector
    from .events import EventBatch
    from .governance import PolicyVote
    from .jobs import JobSpec
    from .store import Store

PROJECT = "cdp_federated"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- Set-up --------------------------------------------------------------------------------------


@hookspec
def cdp_register_connectors() -> list[type[Connector]]:
    """Return connector classes this plugin provides.

    Called once when the connector registry is built. Results from every plugin are collected and
    flattened; each class's ``type_name`` must be unique across all plugins (a clash is a
    :class:`~cdp_federated.errors.PluginError` naming both plugins).
    """


@hookspec
def cdp_register_cli_commands(app: typer.Typer) -> None:
    """Add commands to the ``cdp-fl`` command-line app.

    Called once when the CLI starts. Every implementation is called; return value ignored.
    """


# --- Ingestion -----------------------------------------------------------------------------------


@hookspec
def cdp_process_events(batch: EventBatch, conn: Connection, store: Store) -> None:
    """Apply a batch of validated, de-duplicated events.

    Called once per batch (never per event) by the host, inside the batch's database transaction
    ``conn`` on ``store``. Every implementation is called. If any raises, the whole batch rolls back
    and the host retries its events one at a time, dead-lettering only those that fail, so no
    accepted event is lost and none is half-applied. Return value ignored.
    """


@hookspec
def cdp_ingest_finished(store: Store, stats: dict[str, Any]) -> None:
    """Called once after an ingest run has committed its last batch.

    ``stats`` holds ``received``, ``applied``, ``duplicates`` and ``dead_lettered``. Used, for
    example, to refresh derived features. Every implementation is called; return value ignored.
    """


# --- Consent -------------------------------------------------------------------------------------


@hookspec
def cdp_consent_predicates(purpose: str, jurisdiction_column: str) -> pl.Expr | None:
    """Return a polars boolean expression that keeps only rows allowed for ``purpose``, or ``None``.

    Called once per training data load (never per row). The frame has a ``profile_id`` column, the
    connector's feature columns and ``jurisdiction_column``. All non-``None`` expressions are ANDed
    with the consent ledger's own filter, so any plugin's deny wins and ``None`` abstains.
    """


# --- Governance ----------------------------------------------------------------------------------


@hookspec
def cdp_policy_decision(job: JobSpec, participant: str) -> PolicyVote | None:
    """Vote on whether ``participant`` may take part in ``job``.

    Called once per participant when a job starts, before any data is read. Every implementation is
    called: any vote with ``allow=False`` denies (its reason is reported and audited), ``None``
    abstains, and the job proceeds when no plugin denies.
    """


# --- Training lifecycle --------------------------------------------------------------------------


@hookspec
def cdp_job_started(job: JobSpec, participants: list[str]) -> None:
    """Called on the coordinator side once a job has passed governance and before round 1.

    Every implementation is called; return value ignored.
    """


@hookspec
def cdp_round_ended(job: JobSpec, round_number: int, metrics: dict[str, Any]) -> None:
    """Called after round ``round_number`` (1-based) is committed, with the round's aggregate
    metrics (never per-party values): ``round``, ``train_loss`` (example-weighted mean),
    ``participants`` (names that reported), ``failed`` (names that did not) and ``num_examples``
    (total). Every implementation is called; return value ignored.
    """


@hookspec
def cdp_model_published(job: JobSpec, model_id: str, path: str, lineage: dict[str, Any]) -> None:
    """Called once when a trained model has been written to the registry at ``path``.

    Every implementation is called; return value ignored.
    """


# --- Scoring -------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def cdp_score_profile(
    profile_id: str, store: Store, model_id: str | None, purpose: str
) -> dict[str, Any] | None:
    """Score one profile with a published model (the latest when ``model_id`` is ``None``).

    Called by the host when it wants a score back on a profile. First non-``None`` result wins.
    The built-in scorer returns ``{"profile_id", "model_id", "score"}`` only when the profile's
    consent allows ``purpose``, and ``None`` when it does not or when the profile is unknown.
    """
