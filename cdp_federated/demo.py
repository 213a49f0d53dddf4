"""The demo: three regional data centres of one retailer train one propensity model together.

Each region's Segment log is ingested into its own store, features and a 30-day purchase label are
derived as of the cutoff, rows are filtered by consent at training time through the SQL connector
(the ledger's allowed ids pushed down as a semi-join), and a federated logistic regression is
trained in-process across the three. The coordinator sees parameters, sums and score histograms
only. Each participant runs under its own copy of a policy (``policies/internal-regions.yaml`` by
default): it decides locally before reading a row and again once its consented rows are counted,
re-checks consent every round, and records every decision, its consent funnel, each round and the
published model in its own signed, hash-chained audit log. As a simulation, the demo also pools the training rows to fit a centralized scikit-learn
baseline on exactly the same rows, which a real federation could not do.
"""

from __future__ import annotations

import hashlib
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
from .consent.active import activate_policy
from .consent.ledger import allowed_ids
from .coordinator.gbm_runner import run_horizontal_gbm
from .coordinator.runner import run_horizontal
from .demo_data import generate_scenario
from .errors import ConfigError
from .features import FEATURE_COLUMNS, build_features, build_labels, read_events
from .federation.transport import InProcessTransport
from .governance.audit import AuditLog
from .governance.engine import DecisionContext
from .governance.policy import Policy, load_policy
from .host import Host
from .jobs import JobSpec
from .participant.agent import ParticipantAgent
from .participant.governance import LocalGovernance, decision_context
from .participant.pipeline import Funnel, check_policy, load_consented, split_train_test
from .plugins import make_plugin_manager
from .registry import job_spec_hash, save_model
from .results import make_result
from .settings import normalize_db_url
from .simulate import centralized_score
from .store import TCF_VENDORS_META, Store, open_store

__all__ = ["run_demo", "DEMO_QUERY", "LABEL"]

LABEL = "purchased_30d"
PURPOSE = "model_training"
OUTPUT_USE = "scoring"
DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "policies" / "internal-regions.yaml"
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
    governance: LocalGovernance


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
    policy: Policy,
    context: DecisionContext,
    key_dir: Path,
) -> _Party:
    url = normalize_db_url(db_path)
    store = open_store(url, create=True)
    # The ledger records TCF consent for the vendors its policy relies on.
    vendors = sorted(
        {p.tcf.vendor_id for p in policy.consent.purposes if p.tcf and p.tcf.vendor_id}
    )
    store.set_meta(TCF_VENDORS_META, ",".join(map(str, vendors)))
    activate_policy(store, policy)  # scoring later answers consent with the same rule
    stats = Host(store, pm).ingest_path(events_path)
    events = read_events(store).collect().lazy()
    build_features(store, cutoff, events=events)
    build_labels(store, cutoff, name=LABEL, window_days=label_window_days, events=events)
    audit = AuditLog.open(store, key_path=key_dir / f"{name}-audit.key", create_key=True)
    governance = LocalGovernance(policy, audit, context)
    # Governance first: the local policy and every plugin decide before any training row is read.
    governance.decide(job, stage="before_read")
    check_policy(pm, job, name)
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
            connector,
            pm=pm,
            purpose=job.purpose,
            at=trained_at,
            ledger=store,
            rule=governance.consent_rule(job),
        )
    governance.decide(job, stage="after_consent", rows_available=funnel.consented)
    train, test = split_train_test(frame, float(job.params.get("test_fraction", 0.2)))
    governance.consent_filtered(
        job, rows_in=funnel.rows_in, consented=funnel.consented, aligned=None, trained=train.height
    )
    governance.job_started(job)
    return _Party(store, train, test, funnel, stats.to_dict(), governance)


def _contexts(policy: Policy, names: list[str], now: datetime) -> dict[str, DecisionContext]:
    """How each demo participant describes itself to its own policy engine."""
    return {name: decision_context(policy, name, names, now, OUTPUT_USE) for name in names}


def _load_policy(path: Path | None) -> Policy:
    path = Path(path) if path is not None else DEFAULT_POLICY
    if not path.is_file():
        raise ConfigError(
            "policy file not found",
            field="--policy",
            value=str(path),
            fix="give a policy YAML (templates are in the repository's policies/ folder)",
        )
    return load_policy(path)


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


GBM_TREES = 40
GBM_PARAMS = {"max_depth": 4, "learning_rate": 0.1, "max_bins": 32, "lambda": 1.0}


def _run_gbm(
    job: JobSpec,
    parties: dict[str, _Party],
    transport: InProcessTransport,
    lineage: dict[str, Any],
    models_dir: Path,
    *,
    pm: pluggy.PluginManager,
    gbm_trees: int,
    step: Callable[[str], None],
) -> dict[str, Any] | None:
    """The same participants train a histogram GBM on the same consented rows; each decides
    under its own policy first, as for the first job. ``gbm_trees=0`` skips it."""
    if gbm_trees <= 0:
        return None
    started = time.perf_counter()
    gbm_job = JobSpec.from_dict(
        job.to_dict()
        | {
            "job_id": f"{job.job_id}-gbm",
            "model": "gbm",
            "rounds": gbm_trees,
            "params": {"test_fraction": job.params.get("test_fraction", 0.2), **GBM_PARAMS},
        }
    )
    for party in parties.values():
        party.governance.decide(gbm_job, stage="before_read")
        party.governance.decide(
            gbm_job, stage="after_consent", rows_available=party.funnel.consented
        )
        party.governance.job_started(gbm_job)
    step(f"training: histogram GBM, {gbm_trees} trees across {len(parties)} participants")
    participants = sorted(parties)

    def on_tree(record) -> None:
        metrics = {"tree": record.tree, "leaves": record.leaves, "participants": participants}
        for party in parties.values():
            party.governance.round_committed(gbm_job, metrics, party.train.height)

    result = run_horizontal_gbm(gbm_job, transport, pm=pm, on_round=on_tree)
    train = pl.concat([p.train for p in parties.values()])
    test = pl.concat([p.test for p in parties.values()])
    centralized = centralized_score(
        "gbm", "binary", train, test, list(job.features), LABEL, gbm_job.params, gbm_trees
    )
    gbm_lineage = lineage | {
        "job_id": gbm_job.job_id,
        "params": dict(gbm_job.params) | {"trees": gbm_trees},
        "rounds": result.rounds,
        "job_spec_hash": job_spec_hash(gbm_job),
        "metrics": {
            "auc": round(result.test.auc, 4),
            "logloss": round(result.test.logloss, 4),
            "accuracy": round(result.test.accuracy, 4),
        },
    }
    gbm_lineage.pop("calibration", None)  # measured for the logistic model only
    model_id, model_path = save_model(
        models_dir,
        kind="gbm",
        model=result.estimator,
        lineage=gbm_lineage,
        stores=[p.store for p in parties.values()],
        name="demo-purchase-propensity-gbm",
    )
    pm.hook.cdp_model_published(
        job=gbm_job, model_id=model_id, path=str(model_path), lineage=gbm_lineage
    )
    digest = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    for party in parties.values():
        party.governance.model_published(gbm_job, model_id, digest, str(model_path))
    return {
        "auc": round(result.test.auc, 4),
        "centralized_auc": round(centralized, 4),
        "logloss": round(result.test.logloss, 4),
        "trees": result.rounds,
        "seconds": round(time.perf_counter() - started, 2),
        "model_id": model_id,
        "model_path": str(model_path),
    }


def run_demo(
    out_dir: Path,
    *,
    seed: int = 7,
    customers: int = 6000,
    rounds: int = 30,
    pm: pluggy.PluginManager | None = None,
    policy: Path | None = None,
    on_step: Callable[[str], None] | None = None,
    gbm_trees: int = GBM_TREES,
) -> dict[str, Any]:
    """Run the whole scenario under ``out_dir`` (replaced) and return the shared result schema.

    A participant whose policy refuses the job raises
    :class:`~cdp_federated.errors.PolicyViolation` with every failed rule, after recording the
    refusal in its audit log."""
    step = on_step or (lambda _msg: None)
    started = time.perf_counter()
    the_policy = _load_policy(policy)
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
    contexts = _contexts(the_policy, list(scenario.region_files), trained_at)
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
            policy=the_policy,
            context=contexts[name],
            key_dir=out_dir / "keys",
        )

    def provider(party: _Party) -> Callable[[JobSpec, str], pl.DataFrame]:
        return lambda _job, split: party.train if split == "train" else party.test

    def gate(party: _Party) -> Callable[[JobSpec], pl.Series]:
        rule = party.governance.consent_rule(job)  # consent re-checked every round
        return lambda j: (
            allowed_ids(party.store, j.purpose, trained_at, rule=rule)
            .as_frame()
            .collect()
            .get_column("profile_id")
        )

    agents = {
        name: ParticipantAgent(name, provider(party), consent_gate=gate(party))
        for name, party in parties.items()
    }
    transport = InProcessTransport({name: agent.handle for name, agent in agents.items()})
    step(f"training: {rounds} rounds of FedAvg across {len(parties)} participants")

    def on_round(record) -> None:
        metrics = {
            "round": record.round,
            "participants": list(record.participants),
            "failed": sorted(record.failures),
            "train_loss": record.train_loss,
        }
        for name, party in parties.items():
            if name in record.participants:
                local = party.train.height - agents[name].revoked.get("train", 0)
                party.governance.round_committed(job, metrics, local)

    result = run_horizontal(job, transport, pm=pm, on_round=on_round)
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
        "rounds": result.rounds,
        "job_spec_hash": job_spec_hash(job),
        "policy": {
            "name": the_policy.name,
            "version": the_policy.version,
            "hash": the_policy.content_hash,
        },
        # Every participant ran its own copy of the policy; the registry records each one's hash.
        "policies": {
            name: {
                "name": the_policy.name,
                "version": the_policy.version,
                "hash": the_policy.content_hash,
            }
            for name in parties
        },
        "metrics": {
            "auc": round(result.auc, 4),
            "logloss": round(result.logloss, 4),
            "accuracy": round(result.accuracy, 4),
            "ece": round(result.evaluations["test"].ece, 4),
        },
        "calibration": [row.to_dict() for row in result.evaluations["test"].reliability],
    }
    model_id, model_path = save_model(
        out_dir / "models",
        kind="logreg",
        model=result.estimator,
        lineage=lineage,
        stores=[p.store for p in parties.values()],
        name="demo-purchase-propensity",
    )
    pm.hook.cdp_model_published(job=job, model_id=model_id, path=str(model_path), lineage=lineage)
    digest = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    for party in parties.values():
        party.governance.model_published(job, model_id, digest, str(model_path))
    gbm = _run_gbm(
        job, parties, transport, lineage, out_dir / "models", pm=pm, gbm_trees=gbm_trees, step=step
    )
    audit = {name: party.governance.close() for name, party in parties.items()}
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
        card_path=str(Path(model_path).parent / "model_card.md"),
        policy=lineage["policy"],
        audit=audit,
        gbm=gbm,
    )
