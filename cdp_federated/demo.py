"""The demo: three regional data centres of one retailer train one propensity model together.

Each region's Segment log is ingested into its own store, features and a 30-day purchase label are
derived as of the cutoff, rows are filtered by consent at training time through the SQL connector
(the ledger's allowed ids pushed down as a semi-join), and a federated logistic regression is
trained in-process across the three. The coordinator sees parameters, sums and score histograms
only. As a simulation, the demo also pools the training rows to fit a centralized scikit-learn
baseline on exactly the same rows, which a real federation could not do.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pluggy
import polars as pl

from .connector import ConnectorConfig, ConnectorRegistry
from .coordinator.runner import run_horizontal
from .demo_data import generate_scenario
from .features import FEATURE_COLUMNS, build_features, build_labels, read_events
from .federation.transport import InProcessTransport
from .host import Host
from .jobs import JobSpec
from .participant.agent import ParticipantAgent
from .participant.pipeline import Funnel, check_policy, load_consented, split_train_test
from .plugins import make_plugin_manager
from .registry import save_model
from .results import make_result
from .settings import normalize_db_url
from .store import Store, open_store

__all__ = ["run_demo", "DEMO_QUERY", "LABEL"]

LABEL = "purchased_30d"
PURPOSE = "model_training"
# What a participant exposes to training: features, the label and the jurisdiction, per profile.
DEMO_QUERY = (
    "SELECT f.*, p.jurisdiction, l.value AS purchased_30d FROM profile_features f "
    "JOIN profile_labels l ON l.profile_id = f.profile_id AND l.name = 'purchased_30d' "
    "LEFT JOIN profiles p ON p.profile_id = f.profile_id"
)


@dataclass
class _Party:
    store: Store
    train: pl.DataFrame
    test: pl.DataFrame
    funnel: Funnel
    ingest: dict[str, int]


def _prepare_party(
    name: str,
    events_path: Path,
    db_path: Path,
    *,
    pm: pluggy.PluginManager,
    registry: ConnectorRegistry,
    job: JobSpec,
    cutoff: datetime,
    trained_at: datetime,
    label_window_days: int,
) -> _Party:
    url = normalize_db_url(db_path)
    store = open_store(url, create=True)
    stats = Host(store, pm).ingest_path(events_path)
    events = read_events(store).collect().lazy()
    build_features(store, cutoff, events=events)
    build_labels(store, cutoff, name=LABEL, window_days=label_window_days, events=events)
    check_policy(pm, job, name)  # governance first: before any training row is read
    config = ConnectorConfig(
        type="sql",
        name=name,
        url=url,
        query=DEMO_QUERY,
        features=job.features,
        label=LABEL,
        jurisdiction_column="jurisdiction",
    )
    with registry.open(config) as connector:
        frame, funnel = load_consented(
            connector, pm=pm, purpose=job.purpose, at=trained_at, ledger=store
        )
    train, test = split_train_test(frame, float(job.params.get("test_fraction", 0.2)))
    return _Party(store, train, test, funnel, stats.to_dict())


def _centralized_auc(parties: dict[str, _Party], features: list[str], c: float) -> float:
    """Baseline on the pooled training rows, standardised the way the federation does it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    train = pl.concat([p.train for p in parties.values()])
    test = pl.concat([p.test for p in parties.values()])
    x = train.select(features).to_numpy()
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    model = LogisticRegression(C=c, max_iter=2000)
    model.fit((x - mean) / std, train[LABEL].to_numpy())
    scores = model.predict_proba((test.select(features).to_numpy() - mean) / std)[:, 1]
    return float(roc_auc_score(test[LABEL].to_numpy(), scores))


def run_demo(
    out_dir: Path,
    *,
    seed: int = 7,
    customers: int = 6000,
    rounds: int = 30,
    pm: pluggy.PluginManager | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the whole scenario under ``out_dir`` (replaced) and return the shared result schema."""
    step = on_step or (lambda _msg: None)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    pm = pm or make_plugin_manager()
    registry = ConnectorRegistry(pm)

    step("generating a synthetic retailer: three regional data centres")
    scenario = generate_scenario(out_dir / "events", seed=seed, customers=customers)
    job = JobSpec(
        job_id=f"demo-{seed}",
        kind="horizontal",
        model="logreg",
        purpose=PURPOSE,
        features=FEATURE_COLUMNS,
        label=LABEL,
        rounds=rounds,
        params={"C": 1.0, "test_fraction": 0.2},
    )
    trained_at = scenario.cutoff + timedelta(days=scenario.label_window_days)
    parties: dict[str, _Party] = {}
    for name, path in scenario.region_files.items():
        step(f"{name}: ingesting events, deriving features, filtering by consent")
        parties[name] = _prepare_party(
            name,
            path,
            out_dir / f"{name}.sqlite",
            pm=pm,
            registry=registry,
            job=job,
            cutoff=scenario.cutoff,
            trained_at=trained_at,
            label_window_days=scenario.label_window_days,
        )

    def provider(party: _Party) -> Callable[[JobSpec, str], pl.DataFrame]:
        return lambda _job, split: party.train if split == "train" else party.test

    agents = {name: ParticipantAgent(name, provider(party)) for name, party in parties.items()}
    transport = InProcessTransport({name: agent.handle for name, agent in agents.items()})
    step(f"training: {rounds} rounds of FedAvg across {len(parties)} participants")
    result = run_horizontal(job, transport, pm=pm)
    centralized = _centralized_auc(parties, list(job.features), float(job.params["C"]))

    rows = {name: p.train.height for name, p in parties.items()}
    lineage = {
        "job_id": job.job_id,
        "purpose": job.purpose,
        "label": LABEL,
        "parties": sorted(parties),
        "rows_per_party": rows,
        "funnel": {name: p.funnel.to_dict(trained=p.train.height) for name, p in parties.items()},
        "consent_evaluated_at": trained_at.isoformat(),
        "features_as_of": scenario.cutoff.isoformat(),
        "params": job.params | {"rounds": rounds},
        "metrics": {"auc": round(result.auc, 4), "logloss": round(result.logloss, 4)},
    }
    model_id, model_path = save_model(
        out_dir / "models",
        kind="logreg",
        model=result.estimator.to_dict(),
        lineage=lineage,
        stores=[p.store for p in parties.values()],
    )
    pm.hook.cdp_model_published(job=job, model_id=model_id, path=str(model_path), lineage=lineage)
    for party in parties.values():
        party.store.dispose()
    return make_result(
        command="demo",
        status="ok",
        auc=round(result.auc, 4),
        centralized_auc=round(centralized, 4),
        logloss=round(result.logloss, 4),
        accuracy=round(result.accuracy, 4),
        rows_per_party=rows,
        test_rows_per_party={name: p.test.height for name, p in parties.items()},
        funnel=lineage["funnel"],
        ingest={name: p.ingest for name, p in parties.items()},
        rounds=result.rounds,
        seconds=round(time.perf_counter() - started, 2),
        databases={name: p.store.display_url for name, p in parties.items()},
        model_path=str(model_path),
        model_id=model_id,
    )
