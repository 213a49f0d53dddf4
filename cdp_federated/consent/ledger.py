"""The consent ledger's answer for a purpose at a time, as SQL (pushed down) or as a polars frame."""

from __future__ import annotations

from datetime import datetime

import polars as pl
from sqlalchemy import Select, and_, case, false, func, or_, select, true

from ..store import Store, schema
from .purposes import PurposeRule, purpose_rule

__all__ = ["LedgerAllowedIds", "allowed_ids"]


class LedgerAllowedIds:
    """Profile ids whose consent allows ``rule.purpose`` at ``at`` (see purposes.py for the rules).

    Implements the connector layer's ``AllowedIds`` protocol: a SQL connector on the same database
    embeds :meth:`as_sql` as a semi-join; other connectors semi-join :meth:`as_frame`.
    """

    def __init__(self, store: Store, rule: PurposeRule, at: datetime) -> None:
        self.store = store
        self.rule = rule
        self.at = at
        self.database_url: str | None = store.url

    def as_sql(self) -> Select:
        cr, prof = schema.consent_records, schema.profiles
        rule = self.rule
        deciding = rule.signals + rule.opt_out_signals
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
        grant_signal = and_(ranked.c.granted == true(), ranked.c.purpose.in_(rule.signals))
        latest = (
            select(
                ranked.c.profile_id,
                func.max(case((ranked.c.granted == false(), 1), else_=0)).label("denied"),
                func.max(case((grant_signal, 1), else_=0)).label("granted"),
            )
            .where(ranked.c.rn == 1)
            .group_by(ranked.c.profile_id)
            .subquery("latest")
        )
        opt_out_default = or_(
            false(), *[prof.c.jurisdiction.like(prefix + "%") for prefix in rule.opt_out_prefixes]
        )
        return (
            select(prof.c.profile_id)
            .select_from(prof.outerjoin(latest, latest.c.profile_id == prof.c.profile_id))
            .where(func.coalesce(latest.c.denied, 0) == 0)
            .where(or_(func.coalesce(latest.c.granted, 0) == 1, opt_out_default))
        )

    def as_frame(self) -> pl.LazyFrame:
        with self.store.engine.connect() as conn:
            rows = conn.execute(self.as_sql()).all()
        return pl.DataFrame(
            {"profile_id": [r[0] for r in rows]}, schema={"profile_id": pl.String}
        ).lazy()


def allowed_ids(store: Store, purpose: str, at: datetime) -> LedgerAllowedIds:
    """The allowed ids for ``purpose`` at time ``at`` in ``store``'s ledger."""
    return LedgerAllowedIds(store, purpose_rule(purpose), at)
