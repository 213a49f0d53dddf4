"""Consent: signals from events into an immutable ledger, evaluated per purpose at training time."""

from .ledger import LedgerAllowedIds, allowed_ids
from .purposes import DEFAULT_PURPOSES, PurposeRule, purpose_rule
from .signals import consent_records, jurisdiction_of

__all__ = [
    "DEFAULT_PURPOSES",
    "LedgerAllowedIds",
    "PurposeRule",
    "allowed_ids",
    "consent_records",
    "jurisdiction_of",
    "purpose_rule",
]
