"""The consent ledger's answer for a purpose at a time, as SQL (pushed down) or as a polars frame.

One query, never a call per row: rank each profile's records per signal (latest wins), fold them
per profile into "any deny", "any grant" and "TCF group complete", then apply the jurisdiction
default. See purposes.py for the rules.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl
from sqlalchemy import ColumnElement, Select, and_, case, false, func, literal, or_, select, true

from ..store import Store, schema
from .purposes import ConsentRuleLike, purpose_rule, tcf_required_signals

__all__ = ["LedgerAllowedIds", "allowed_ids"]


def _matches(column: ColumnElement, prefixes: tuple[str, ...]) -> ColumnElement:
    """``EU`` matches ``EU``; ``US`` matches ``US`` and ``US-CA`` (never ``USX``)."""
    return or_(false(), *[or_(column == p, column.like(p + "-%")) for p in prefixes])


class LedgerAllowedIds:
    """Profile ids whose consent allows ``rule.purpose`` at ``at``.

    Implements the connector layer's ``AllowedIds`` protocol: a SQL connector on the same database
    embeds :meth:`as_sql` as a semi-join; other connectors semi-join :meth:`as_frame`.
    """

    def __init__(self, store: Store, rule: ConsentRuleLike, at: datetime) -> None:
        self.store = store
        self.rule = rule
        self.at = at
        self.database_url: str | None = store.url

    def as_sql(self) -> Select:
        cr, prof = schema.consent_records, schema.profiles
        rule = self.rule
        tcf_group = tcf_required_signals(rule.tcf)
        deciding = tuple(dict.fromkeys(rule.signals + rule.opt_out_signals + tcf_group))
        ranked = (
            select(
                cr.c.profile_id,
                cr.c.purpose,
                cr.c.granted,
                func.row_number()
                .over(
                    partition_by=(cr.c.profile_id, cr.c.purpose),
                    order_by=(cr.c.timestamp.desc(), cr.c.id.desc()),
                )
                .label("rn"),
            )
            .where(cr.c.purpose.in_(deciding), cr.c.timestamp <= self.at)
            .subquery("ranked")
        )
        is_grant = ranked.c.granted == true()
        grant_signal = and_(is_grant, ranked.c.purpose.in_(rule.signals or ("",)))
        tcf_grant = and_(is_grant, ranked.c.purpose.in_(tcf_group or ("",)))
        latest = (
            select(
                ranked.c.profile_id,
                func.max(case((ranked.c.granted == false(), 1), else_=0)).label("denied"),
                func.max(case((grant_signal, 1), else_=0)).label("granted"),
                func.sum(case((tcf_grant, 1), else_=0)).label("tcf_granted"),
            )
            .where(ranked.c.rn == 1)
            .group_by(ranked.c.profile_id)
            .subquery("latest")
        )
        jurisdiction = prof.c.jurisdiction
        default_allow = case(
            (_matches(jurisdiction, rule.opt_in_prefixes), literal(0)),
            (_matches(jurisdiction, rule.opt_out_prefixes), literal(1)),
            else_=literal(1 if rule.unknown_default else 0),
        )
        granted = [func.coalesce(latest.c.granted, 0) == 1, default_allow == 1]
        if tcf_group:
            granted.append(func.coalesce(latest.c.tcf_granted, 0) == len(tcf_group))
        return (
            select(prof.c.profile_id)
            .select_from(prof.outerjoin(latest, latest.c.profile_id == prof.c.profile_id))
            .where(func.coalesce(latest.c.denied, 0) == 0)
            .where(or_(*granted))
        )

    def as_frame(self) -> pl.LazyFrame:
        with self.store.engine.connect() as conn:
            rows = conn.execute(self.as_sql()).all()
        return pl.DataFrame(
            {"profile_id": [r[0] for r in rows]}, schema={"profile_id": pl.String}
        ).lazy()


def allowed_ids(
    store: Store, purpose: str, at: datetime, *, rule: ConsentRuleLike | None = None
) -> LedgerAllowedIds:
    """The allowed ids for ``purpose`` at time ``at`` in ``store``'s ledger, under ``rule`` (a
    policy's consent rule) or the built-in default for ``purpose``."""
    return LedgerAllowedIds(store, rule if rule is not None else purpose_rule(purpose), at)
