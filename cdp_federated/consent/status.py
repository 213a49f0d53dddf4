"""One profile's consent for a purpose, explained: the decision and the evidence behind it.

The decision comes from the ledger's own query restricted to the profile (so it can never
disagree with what training uses); the evidence lists the latest record of every deciding signal.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from ..store import Store, schema
from .ledger import LedgerAllowedIds
from .purposes import ConsentRuleLike, tcf_required_signals

__all__ = ["consent_status"]


def consent_status(
    store: Store, profile_id: str, rule: ConsentRuleLike, at: datetime
) -> dict[str, Any]:
    cr, prof = schema.consent_records, schema.profiles
    tcf_group = tcf_required_signals(rule.tcf)
    deciding = tuple(dict.fromkeys(rule.signals + rule.opt_out_signals + tcf_group))
    allowed_sql = LedgerAllowedIds(store, rule, at).as_sql().where(prof.c.profile_id == profile_id)
    with store.engine.connect() as conn:
        known = conn.execute(
            select(prof.c.jurisdiction).where(prof.c.profile_id == profile_id)
        ).first()
        allowed = conn.execute(allowed_sql).first() is not None
        rows = conn.execute(
            select(cr.c.purpose, cr.c.granted, cr.c.timestamp, cr.c.source, cr.c.raw)
            .where(cr.c.profile_id == profile_id, cr.c.purpose.in_(deciding), cr.c.timestamp <= at)
            .order_by(cr.c.timestamp, cr.c.id)
        ).all()
    latest: dict[str, Any] = {}
    for purpose, granted, ts, source, raw in rows:  # ordered: the last one per signal wins
        latest[purpose] = {
            "signal": purpose,
            "granted": bool(granted),
            "timestamp": (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).isoformat(),
            "source": source,
            "evidence": (raw or "")[:200],
        }
    jurisdiction = known[0] if known else None
    return {
        "profile_id": profile_id,
        "purpose": rule.purpose,
        "at": at.isoformat(),
        "known_profile": known is not None,
        "jurisdiction": jurisdiction,
        "default": _default(rule, jurisdiction),
        "allowed": allowed,
        "reason": _reason(rule, latest, tcf_group, jurisdiction),
        "signals": [latest[s] for s in deciding if s in latest],
    }


def _matches(jurisdiction: str | None, prefixes: tuple[str, ...]) -> bool:
    return jurisdiction is not None and any(
        jurisdiction == p or jurisdiction.startswith(p + "-") for p in prefixes
    )


def _default(rule: ConsentRuleLike, jurisdiction: str | None) -> str:
    if _matches(jurisdiction, rule.opt_in_prefixes):
        return "deny (opt-in jurisdiction)"
    if _matches(jurisdiction, rule.opt_out_prefixes):
        return "allow (opt-out jurisdiction)"
    return f"{'allow' if rule.unknown_default else 'deny'} (jurisdiction not covered by the policy)"


def _reason(rule, latest, tcf_group, jurisdiction) -> str:
    denies = [s for s, r in latest.items() if not r["granted"]]
    if denies:
        return f"denied by {', '.join(denies)}"
    grants = [s for s in rule.signals if s in latest and latest[s]["granted"]]
    if grants:
        return f"granted by {', '.join(grants)}"
    if tcf_group and all(s in latest and latest[s]["granted"] for s in tcf_group):
        return "granted by the TC string (all required TCF signals)"
    return f"no deciding signal: default {_default(rule, jurisdiction)}"
