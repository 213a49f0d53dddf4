"""Declarative governance policies: the frozen model, and :func:`load_policy` to build it.

:func:`load_policy` validates a YAML file once, at the boundary, and reports every error with its
line (see :mod:`.policy_load`; semantic checks in :mod:`.policy_checks`, built-in PII in
:mod:`.pii`).

A policy's identity is :attr:`Policy.content_hash`: the SHA-256 of the canonical JSON of the
validated, normalised document (defaults filled in, lists that are sets sorted, keys sorted), so
comments, whitespace, key order, list order and number spelling (``8`` vs ``8.0``) do not change it,
while any change of value does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PolicySchemaError as PolicySchemaError
from ..errors import PolicyViolation
from .pii import BUILTIN_PII, matches_pattern, normalise_column_name, pii_term
from .policy_checks import JsonPath as JsonPath
from .policy_checks import PathPart as PathPart
from .policy_checks import region_matches
from .policy_load import canonical_bytes, normalise_document, policy_schema, read_validated

__all__ = [
    "BUILTIN_PII",
    "ConsentPurpose",
    "ConsentRule",
    "ConsentSettings",
    "DPBudget",
    "DPSettings",
    "FeatureSettings",
    "IdentitySettings",
    "Minimums",
    "OutputSettings",
    "Partner",
    "Policy",
    "PrivacySettings",
    "PurposeSettings",
    "Residency",
    "TCFRequirement",
    "load_policy",
    "matches_pattern",
    "normalise_column_name",
    "pii_term",
    "policy_schema",
    "region_matches",
]


# --- The model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TCFRequirement:
    """IAB TCF v2.2: the TC string must grant every purpose in ``purposes`` (and, with
    ``vendor_id``, the vendor) on ``basis`` (``consent`` or ``legitimate_interest``)."""

    purposes: tuple[int, ...]
    vendor_id: int | None
    basis: str


@dataclass(frozen=True)
class ConsentRule:
    """What the consent ledger needs to decide a job purpose (see ``consent/purposes.py``)."""

    purpose: str
    signals: tuple[str, ...]
    opt_out_signals: tuple[str, ...]
    tcf: TCFRequirement | None
    opt_in_prefixes: tuple[str, ...]
    opt_out_prefixes: tuple[str, ...]
    unknown_default: bool


@dataclass(frozen=True)
class PurposeSettings:
    allowed: tuple[str, ...]
    lawful_basis: str


@dataclass(frozen=True)
class ConsentPurpose:
    purpose: str
    signals: tuple[str, ...]
    opt_out_signals: tuple[str, ...]
    tcf: TCFRequirement | None


@dataclass(frozen=True)
class ConsentSettings:
    unknown_jurisdiction: str  # "deny" | "allow"
    opt_in: tuple[str, ...]
    opt_out: tuple[str, ...]
    purposes: tuple[ConsentPurpose, ...]  # sorted by purpose

    def get(self, purpose: str) -> ConsentPurpose | None:
        return next((p for p in self.purposes if p.purpose == purpose), None)


@dataclass(frozen=True)
class Partner:
    name: str
    organisation: str
    region: str
    roles: tuple[str, ...]


@dataclass(frozen=True)
class FeatureSettings:
    allowed: tuple[str, ...]
    forbidden: tuple[str, ...]


@dataclass(frozen=True)
class Residency:
    data_regions: tuple[str, ...]
    coordinator_regions: tuple[str, ...]


@dataclass(frozen=True)
class Minimums:
    rows_per_party: int
    cohort_size: int
    participants_per_round: int | None = None


@dataclass(frozen=True)
class IdentitySettings:
    methods: tuple[str, ...]


@dataclass(frozen=True)
class DPBudget:
    epsilon: float
    window_days: int


@dataclass(frozen=True)
class DPSettings:
    epsilon_per_run: float
    delta: float
    budget: DPBudget | None


@dataclass(frozen=True)
class PrivacySettings:
    secure_aggregation: str  # "required" | "optional"
    dp: DPSettings | None


@dataclass(frozen=True)
class OutputSettings:
    uses: tuple[str, ...]
    retention_days: int


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build it with :func:`load_policy`; ``content_hash`` is its identity."""

    name: str
    version: int
    description: str
    purposes: PurposeSettings
    consent: ConsentSettings
    partners: tuple[Partner, ...]  # sorted by name
    features: FeatureSettings
    residency: Residency
    minimums: Minimums
    identity: IdentitySettings
    privacy: PrivacySettings
    outputs: OutputSettings
    content_hash: str
    canonical_json: str = field(repr=False, compare=False, default="")
    source: str = field(compare=False, default="")  # where it was loaded from (not hashed)

    @property
    def short_hash(self) -> str:
        return self.content_hash[:12]

    @property
    def organisations(self) -> tuple[str, ...]:
        return tuple(sorted({p.organisation for p in self.partners}))

    def partner(self, name: str) -> Partner | None:
        return next((p for p in self.partners if p.name == name), None)

    def purpose_rule(self, job_purpose: str) -> ConsentRule:
        """The consent ledger's rule for ``job_purpose``; PolicyViolation when the policy does
        not allow that purpose."""
        entry = self.consent.get(job_purpose)
        if job_purpose not in self.purposes.allowed or entry is None:
            raise PolicyViolation(
                f"policy {self.name!r} does not allow purpose {job_purpose!r}",
                reasons=(
                    f"purposes.allowed: {job_purpose!r} is not in {list(self.purposes.allowed)}",
                ),
                field="purpose",
                value=job_purpose,
                fix=f"use one of {', '.join(self.purposes.allowed)}, or change the policy",
            )
        return ConsentRule(
            purpose=job_purpose,
            signals=entry.signals,
            opt_out_signals=entry.opt_out_signals,
            tcf=entry.tcf,
            opt_in_prefixes=self.consent.opt_in,
            opt_out_prefixes=self.consent.opt_out,
            unknown_default=self.consent.unknown_jurisdiction == "allow",
        )

    def to_dict(self) -> dict[str, Any]:
        """The normalised document: :attr:`content_hash` is the SHA-256 of its canonical JSON
        (:attr:`canonical_json`: keys sorted, no spaces, UTF-8)."""
        return json.loads(self.canonical_json)


# --- Loading ---------------------------------------------------------------------------------------


def load_policy(path_or_text: str | Path) -> Policy:
    """Load and validate a policy from a file path or from YAML text.

    A :class:`~pathlib.Path`, or a one-line string naming an existing file or ending in
    ``.yaml``/``.yml``/``.json``, is read as a file; any other string is YAML text. Raises
    :class:`PolicySchemaError` listing every error with its line.
    """
    data, source = read_validated(path_or_text)
    return _build(data, source)


def _tcf(entry: Mapping[str, Any] | None) -> TCFRequirement | None:
    if not entry:
        return None
    return TCFRequirement(tuple(entry["purposes"]), entry.get("vendor_id"), entry["basis"])


def _build(data: Mapping[str, Any], source: str) -> Policy:
    doc = normalise_document(data)
    canonical = canonical_bytes(doc)
    consent, privacy, dp = doc["consent"], doc["privacy"], doc["privacy"]["dp"]
    return Policy(
        name=doc["policy"],
        version=doc["version"],
        description=doc["description"],
        purposes=PurposeSettings(
            tuple(doc["purposes"]["allowed"]), doc["purposes"]["lawful_basis"]
        ),
        consent=ConsentSettings(
            unknown_jurisdiction=consent["unknown_jurisdiction"],
            opt_in=tuple(consent["jurisdictions"]["opt_in"]),
            opt_out=tuple(consent["jurisdictions"]["opt_out"]),
            purposes=tuple(
                ConsentPurpose(
                    name,
                    tuple(entry["signals"]),
                    tuple(entry["opt_out_signals"]),
                    _tcf(entry["tcf"]),
                )
                for name, entry in sorted(consent["purposes"].items())
            ),
        ),
        partners=tuple(
            Partner(p["name"], p["organisation"], p["region"], tuple(p["roles"]))
            for p in doc["partners"]
        ),
        features=FeatureSettings(
            tuple(doc["features"]["allowed"]), tuple(doc["features"]["forbidden"])
        ),
        residency=Residency(
            tuple(doc["residency"]["data_regions"]), tuple(doc["residency"]["coordinator_regions"])
        ),
        minimums=Minimums(
            doc["minimums"]["rows_per_party"],
            doc["minimums"]["cohort_size"],
            doc["minimums"].get("participants_per_round"),
        ),
        identity=IdentitySettings(tuple(doc["identity"]["methods"])),
        privacy=PrivacySettings(
            privacy["secure_aggregation"],
            None
            if dp is None
            else DPSettings(
                dp["epsilon_per_run"],
                dp["delta"],
                None
                if dp["budget"] is None
                else DPBudget(dp["budget"]["epsilon"], dp["budget"]["window_days"]),
            ),
        ),
        outputs=OutputSettings(tuple(doc["outputs"]["uses"]), doc["outputs"]["retention_days"]),
        content_hash=hashlib.sha256(canonical).hexdigest(),
        canonical_json=canonical.decode("utf-8"),
        source=source,
    )
