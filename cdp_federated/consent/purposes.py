"""Which ledger signals allow a job purpose, and each jurisdiction's default.

A rule is what the consent ledger needs to answer "may this profile's row be used for this
purpose at time T". Policies (``governance/policy.py``) produce rules from YAML; without a policy
the built-in :data:`DEFAULT_PURPOSES` apply. The semantics, shared by both:

* per (profile, signal), the latest record at or before T wins;
* any explicit deny among the purpose's signals (or its opt-out signals, e.g. GPC) denies;
* otherwise one granting signal allows, or the TCF group when every one of its required signals
  is granted (a TC string records all its purposes at once, so a missing bit is an explicit deny);
* otherwise the jurisdiction's default: opt-in regimes deny, opt-out regimes allow, and a
  profile whose jurisdiction matches neither (or is unknown) gets ``unknown_default``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..errors import ConfigError

__all__ = [
    "PurposeRule",
    "ConsentRuleLike",
    "TCFRequirementLike",
    "DEFAULT_PURPOSES",
    "purpose_rule",
    "tcf_required_signals",
    "OPT_IN_PREFIXES",
    "OPT_OUT_PREFIXES",
]

# Jurisdictions whose default is "denied without consent" (GDPR, UK GDPR).
OPT_IN_PREFIXES: tuple[str, ...] = ("EU", "UK")
# Jurisdictions whose default is "allowed unless opted out" (US state privacy laws).
OPT_OUT_PREFIXES: tuple[str, ...] = ("US",)


class TCFRequirementLike(Protocol):
    purposes: tuple[int, ...]
    vendor_id: int | None
    basis: str  # "consent" | "legitimate_interest"


class ConsentRuleLike(Protocol):
    """What the ledger reads from a rule (a policy's ``ConsentRule`` or a :class:`PurposeRule`)."""

    purpose: str
    signals: tuple[str, ...]
    opt_out_signals: tuple[str, ...]
    tcf: TCFRequirementLike | None
    opt_in_prefixes: tuple[str, ...]
    opt_out_prefixes: tuple[str, ...]
    unknown_default: bool


@dataclass(frozen=True)
class PurposeRule:
    purpose: str
    signals: tuple[str, ...]  # ledger signals whose latest value decides (grant or deny)
    opt_out_signals: tuple[str, ...] = ()  # ledger signals that can only deny (e.g. GPC)
    tcf: TCFRequirementLike | None = None
    opt_in_prefixes: tuple[str, ...] = OPT_IN_PREFIXES
    opt_out_prefixes: tuple[str, ...] = OPT_OUT_PREFIXES
    unknown_default: bool = False  # never an implicit allow


def tcf_required_signals(tcf: TCFRequirementLike | None) -> tuple[str, ...]:
    """Ledger signals that must all be granted for a TC string to allow the purpose.

    With a vendor id, ``tcf:vendor:V:purpose:N`` already combines the purpose bit, the vendor bit
    and publisher restrictions (see consent/tcf.py); legitimate interest uses the LI bits.
    """
    if tcf is None or not tcf.purposes:
        return ()
    if tcf.basis == "legitimate_interest":
        out = tuple(f"tcf:li:{n}" for n in tcf.purposes)
        return out + ((f"tcf:vendor_li:{tcf.vendor_id}",) if tcf.vendor_id is not None else ())
    if tcf.vendor_id is not None:
        return tuple(f"tcf:vendor:{tcf.vendor_id}:purpose:{n}" for n in tcf.purposes)
    return tuple(f"tcf:purpose:{n}" for n in tcf.purposes)


_ANALYTICS = (
    "segment:Analytics",
    "rudderstack:C0002",
    "consent_mode:analytics_storage",
)
_ADVERTISING = (
    "segment:Advertising",
    "rudderstack:C0004",
    "consent_mode:ad_user_data",
    "consent_mode:ad_personalization",
)

DEFAULT_PURPOSES: dict[str, PurposeRule] = {
    "model_training": PurposeRule("model_training", _ANALYTICS),
    "audience_modeling": PurposeRule(
        "audience_modeling", _ADVERTISING + ("segment:DataSharing",), ("gpc:sale_sharing",)
    ),
    "personalization": PurposeRule(
        "personalization",
        ("segment:Functional", "rudderstack:C0003", "consent_mode:ad_personalization"),
    ),
}


def purpose_rule(purpose: str) -> PurposeRule:
    try:
        return DEFAULT_PURPOSES[purpose]
    except KeyError:
        raise ConfigError(
            "unknown consent purpose",
            field="purpose",
            value=purpose,
            fix=f"use one of {', '.join(sorted(DEFAULT_PURPOSES))}, or a policy that maps it",
        ) from None
