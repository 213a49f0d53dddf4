"""A participant's local pipeline for its part of a vertical job, up to the aligned matrices.

Governance decides on the party's own view of the job before any row is read (its own columns,
identity method ``psi``); a *passive* party whose source has the label column refuses the job (a
:class:`~cdp_federated.errors.PolicyViolation`, recorded in its own audit log: the label must not
leave the active party); consent filters the connector's rows (the ledger pushed down); the
identifiers become PSI inputs (:func:`psi_ids`). :func:`held_out` is the split every party
computes alike on the aligned customers.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from ..connector import PROFILE_ID, ConnectorConfig, ConnectorRegistry
from ..errors import (
    ConfigError,
    IdentifierError,
    NoTrainingDataError,
    PolicyViolation,
    SchemaMismatchError,
)
from ..governance.audit import JOB_REFUSED
from ..jobs import JobSpec
from ..vertical_job import VerticalJob
from .governance import LocalGovernance
from .pipeline import Funnel, check_policy, load_consented

__all__ = ["PartyRows", "psi_ids", "held_out", "local_rows"]


@dataclass
class PartyRows:
    """What the local pipeline hands the protocol: PSI inputs (hashed identifiers, null where
    invalid), the party's own feature matrix in the same row order, the labels (active party
    only), the consent funnel and the governance that decided."""

    ids: pl.Series
    x: np.ndarray
    y: np.ndarray | None
    funnel: Funnel
    governance: LocalGovernance
    spec: JobSpec


def psi_ids(values: pl.Series, *, key_format: str, kind: str, scheme: str, region: str | None):
    """Identifiers as PSI inputs. Emails become the hex SHA-256 of the normalised address, so a
    party holding raw addresses meets one holding only their hashes (``sha256_hex`` or
    ``sha256_b64``); other kinds are their normalised values. Invalid values become null."""
    from ..identity.normalize import normalize_ids

    if key_format == "raw":
        normal = normalize_ids(values, kind=kind, scheme=scheme, default_region=region).values
        if kind != "email":
            return normal
        return normal.map_elements(
            lambda v: hashlib.sha256(v.encode()).hexdigest(), return_dtype=pl.String
        )
    if key_format == "sha256_hex":
        text = values.cast(pl.String).str.strip_chars().str.to_lowercase()
        return pl.select(pl.when(text.str.contains(r"^[0-9a-f]{64}$")).then(text)).to_series()

    def from_b64(v: str) -> str | None:
        try:
            raw = base64.b64decode(v.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        return raw.hex() if len(raw) == 32 else None

    return values.cast(pl.String).map_elements(from_b64, return_dtype=pl.String)


def held_out(ids: pl.Series, fraction: float, salt: str) -> np.ndarray:
    """Which aligned customers are held out: the SHA-256 of ``salt`` + identifier in the first
    ``fraction`` of the hash space (every party computes the same mask)."""
    cut = int(fraction * 2**32)
    return np.array(
        [
            int.from_bytes(hashlib.sha256((salt + v).encode()).digest()[:4], "big") < cut
            for v in ids.to_list()
        ],
        dtype=bool,
    )


def local_rows(
    pipeline: Any,
    vjob: VerticalJob,
    role: str,
) -> PartyRows:
    """The participant's local pipeline for its part of ``vjob`` (``pipeline`` is the runner's
    :class:`~.runner.LocalPipeline`: store, policy, plugins, connector, audit key, consent time).

    Governance decides on the party's own view of the job before any row is read (its columns,
    identity method ``psi``); a passive party whose source has the label column, or lists it as
    a feature, is refused and the refusal is audited; then consent filters the rows."""
    name = pipeline.name
    spec = vjob.local_spec(name)
    governance: LocalGovernance = pipeline._governance()
    governance.context = dataclasses.replace(governance.context, identity_method="psi")
    governance.decide(spec, stage="before_read")
    check_policy(pipeline.pm, spec, name)
    declared = pipeline.connector.get("features")
    if declared is not None and set(spec.features) - set(declared):
        raise SchemaMismatchError(
            f"participant {name!r} does not expose features "
            f"{sorted(set(spec.features) - set(declared))}",
            field="params.parties",
            value=sorted(set(spec.features) - set(declared)),
            fix="ask for the features this participant's connector declares",
        )
    label = spec.label if role == "active" else None
    config = ConnectorConfig(
        **{"name": name, **pipeline.connector, "features": spec.features, "label": label}
    )
    with ConnectorRegistry(pipeline.pm).open(config) as connector:
        if role == "passive" and spec.label in connector.available_columns():
            _refuse_label(governance, spec, name)
        frame, funnel = load_consented(
            connector,
            pm=pipeline.pm,
            purpose=spec.purpose,
            at=pipeline.at(),
            ledger=pipeline.store,
            rule=governance.consent_rule(spec),
        )
    governance.decide(spec, stage="after_consent", rows_available=funnel.consented)
    ids = psi_ids(
        frame[PROFILE_ID],
        key_format=vjob.parties[name].key_format,
        kind=vjob.id_kind,
        scheme=vjob.id_scheme,
        region=vjob.id_region,
    )
    present = ids.drop_nulls()
    if present.len() != present.n_unique():
        raise IdentifierError(
            f"participant {name!r}: an identifier appears on several rows, so its rows cannot "
            "be aligned to one customer",
            field="connector.id_column",
            fix="keep one row per customer in the source",
        )
    x = frame.select(spec.features).to_numpy().astype(np.float64)
    if x.size and not np.isfinite(x).all():
        raise ConfigError(
            f"participant {name!r} has missing or infinite feature values",
            field="params.parties",
            value=name,
            fix="impute missing values in the source before training",
        )
    y = None
    if role == "active":
        y = frame[spec.label].to_numpy().astype(np.float64)
        if not np.isfinite(y).all():
            raise ConfigError("rows without a label", field="job.label", value=spec.label)
    if not present.len():
        raise NoTrainingDataError(
            f"participant {name!r} has no consented row with a valid identifier",
            field="params.id_kind",
            value=vjob.id_kind,
            fix="check consent, the id column and the identifier kind",
        )
    return PartyRows(ids, x, y, funnel, governance, spec)


def _refuse_label(governance: LocalGovernance, spec: JobSpec, name: str) -> None:
    reason = f"vertical.label: passive party {name!r} holds the label column {spec.label!r}"
    governance.audit.append(
        JOB_REFUSED,
        {
            "job_id": spec.job_id,
            "participant": name,
            "stage": "before_read",
            "policy_hash": governance.policy.content_hash,
            "reasons": [reason],
        },
    )
    governance.audit.checkpoint()
    raise PolicyViolation(
        f"participant {name!r} refuses job {spec.job_id!r}: its source holds the label column "
        f"{spec.label!r}, and the label must not leave the active party",
        reasons=(reason,),
        field="job.label",
        value=spec.label,
        fix="drop the label column from the passive party's source, or make it the active party",
    )
