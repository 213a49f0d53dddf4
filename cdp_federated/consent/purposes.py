"""Which ledger signals allow a job purpose, and each jurisdiction's default.

The consent/governance work replaces these defaults with per-policy mappings; the semantics stay:
latest signal per (profile, signal) wins, any explicit deny among the purpose's signals denies,
any grant allows, and without a signal the jurisdiction's default applies (opt-in regimes deny,
opt-out regimes allow, unknown jurisdictions deny).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["PurposeRule", "DEFAULT_PURPOSES", "purpose_rule", "OPT_OUT_PREFIXES"]

# Jurisdictions whose default is "allowed unless opted out" (US state privacy laws).
OPT_OUT_PREFIXES: tuple[str, ...] = ("US",)


@dataclass(frozen=True)
class PurposeRule:
    purpose: str
    signals: tuple[str, ...]  # ledger purposes whose latest value decides (grant or deny)
    opt_out_signals: tuple[str, ...] = ()  # ledger purposes that can only deny (e.g. GPC)
    opt_out_prefixes: tuple[str, ...] = OPT_OUT_PREFIXES


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
            fix=f"use one of {', '.join(sorted(DEFAULT_PURPOSES))}",
        ) from None
