"""Revocation recorded before round k excludes the row from round k onward (real ledger, real agent)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from cdp_federated.consent import allowed_ids
from cdp_federated.coordinator import run_horizontal
from cdp_federated.federation import InProcessTransport
from cdp_federated.host import Host
from cdp_federated.jobs import JobSpec
from cdp_federated.participant import ParticipantAgent
from cdp_federated.store import open_store

T0 = datetime(2026, 3, 1, tzinfo=UTC)
AT = T0 + timedelta(days=30)
FEATURES = ("visits", "spend")


def consent_event(pid: str, granted: bool, ts: datetime, n: int) -> dict:
    return {
        "type": "track",
        "event": "Segment Consent Preference Updated",
        "userId": pid,
        "messageId": f"{pid}-consent-{n}",
        "timestamp": ts.isoformat(),
        "context": {
            "location": {"country": "DE"},
            "consent": {"categoryPreferences": {"Analytics": granted}},
        },
    }


def party(store_url: str, pm, prefix: str, n: int, seed: int):
    store = open_store(store_url, create=True)
    ids = [f"{prefix}-{i:04d}" for i in range(n)]
    Host(store, pm).ingest_events(consent_event(pid, True, T0, 0) for pid in ids)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    y = (x @ np.array([1.0, -0.7]) + rng.normal(scale=0.5, size=n) > 0).astype(float)
    frame = pl.DataFrame({"profile_id": ids, "visits": x[:, 0], "spend": x[:, 1], "label": y})
    return store, ids, frame


def test_revocation_between_rounds_shrinks_the_next_round(tmp_path, pm):
    stores, ids, agents = {}, {}, {}
    for k, name in enumerate(("eu", "uk")):
        store, pids, frame = party(f"sqlite:///{tmp_path / name}.db", pm, name, 300, k)
        stores[name], ids[name] = store, pids

        def gate(job, store=store):
            return allowed_ids(store, job.purpose, AT).as_frame().collect()["profile_id"]

        agents[name] = ParticipantAgent(
            name, lambda job, split, f=frame: f if split == "train" else f[:60], consent_gate=gate
        )
    job = JobSpec("rev", "horizontal", "logreg", "model_training", FEATURES, "label", rounds=5)
    revoked = ids["eu"][:25]

    def on_round(record):
        if record.round == 2:  # recorded after round 2 committed, before round 3 starts
            events = (consent_event(p, False, T0 + timedelta(days=10), 1) for p in revoked)
            Host(stores["eu"], pm).ingest_events(events)

    transport = InProcessTransport({n: a.handle for n, a in agents.items()})
    result = run_horizontal(job, transport, on_round=on_round)
    examples = [r.num_examples for r in result.history]
    assert examples[:2] == [600, 600]
    assert examples[2:] == [575, 575, 575]
    assert agents["eu"].revoked["train"] == 25
    assert agents["uk"].revoked == {}
    # The final evaluation on the test split also excludes revoked rows (first 60 rows of eu).
    assert agents["eu"].revoked.get("test") == 25
    for store in stores.values():
        store.dispose()
