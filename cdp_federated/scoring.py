"""Built-in plugin: scores a consented profile with a published model (``cdp_score_profile``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import polars as pl
from sqlalchemy import select

from .consent.active import active_rule
from .consent.ledger import allowed_ids
from .hookspecs import hookimpl
from .registry import latest_model, load_model
from .store import Store, schema


def _consented(store: Store, profile_id: str, purpose: str) -> bool:
    rule = active_rule(store, purpose)  # the participant's own policy, as in training
    if rule is None:
        return False
    allowed = allowed_ids(store, purpose, datetime.now(UTC), rule=rule).as_sql().subquery()
    stmt = select(allowed.c.profile_id).where(allowed.c.profile_id == profile_id)
    with store.engine.connect() as conn:
        return conn.execute(stmt).first() is not None


@hookimpl
def cdp_score_profile(
    profile_id: str, store: Store, model_id: str | None, purpose: str
) -> dict[str, Any] | None:
    found = latest_model(store, model_id)
    if found is None or not _consented(store, profile_id, purpose):
        return None
    mid, path, digest = found
    model = load_model(path, expected_sha256=digest)
    table = schema.profile_features
    with store.engine.connect() as conn:
        row = conn.execute(select(table).where(table.c.profile_id == profile_id)).mappings().first()
    if row is None:
        return None
    names = list(model.feature_names_in_)
    frame = pl.DataFrame({name: [float(row[name])] for name in names})
    return {
        "profile_id": profile_id,
        "model_id": mid,
        "score": float(model.predict_proba(frame)[0, 1]),
    }
