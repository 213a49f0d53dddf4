"""Governance: the only place that decides allow/deny. Everything else asks it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["PolicyVote", "Decision", "combine_votes"]


@dataclass(frozen=True)
class PolicyVote:
    """One plugin's vote: ``allow=False`` denies with ``reason``; the rule that fired is ``rule``."""

    allow: bool
    reason: str = ""
    rule: str = ""


@dataclass(frozen=True)
class Decision:
    allow: bool
    reasons: tuple[str, ...]


def combine_votes(votes: Iterable[PolicyVote | None]) -> Decision:
    """Any deny wins; ``None`` abstains; no votes at all allows (local policies vote separately)."""
    cast = [v for v in votes if v is not None]
    denies = tuple(f"{v.rule or 'plugin'}: {v.reason}" for v in cast if not v.allow)
    if denies:
        return Decision(False, denies)
    return Decision(True, tuple(f"{v.rule or 'plugin'}: {v.reason}" for v in cast if v.reason))
