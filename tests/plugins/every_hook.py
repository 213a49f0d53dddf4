"""Test fixture plugin implementing every hook, recording each call."""

from __future__ import annotations

from typing import Any

import polars as pl

from cdp_federated import hookimpl
from cdp_federated.connector import Connector
from cdp_federated.governance import PolicyVote


class EveryHook:
    """Register an instance; ``calls`` lists (hook name, kwargs) in call order."""

    def __init__(self, *, deny_jobs: bool = False, drop_profile: str | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.deny_jobs = deny_jobs
        self.drop_profile = drop_profile

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    @hookimpl
    def cdp_register_connectors(self) -> list[type[Connector]]:
        self.calls.append(("cdp_register_connectors", {}))
        return [ConstantConnector]

    @hookimpl
    def cdp_register_cli_commands(self, app: Any) -> None:
        self.calls.append(("cdp_register_cli_commands", {"app": app}))

        @app.command("fixture-hello")
        def hello() -> None:
            """Say hello (registered by the test fixture plugin)."""
            print("hello from the fixture plugin")

    @hookimpl
    def cdp_process_events(self, batch: Any, conn: Any, store: Any) -> None:
        self.calls.append(("cdp_process_events", {"n": len(batch), "source": batch.source}))
        for ev in batch.events:
            if ev.properties.get("explode"):
                raise RuntimeError(f"fixture refuses {ev.message_id}")

    @hookimpl
    def cdp_ingest_finished(self, store: Any, stats: dict[str, Any]) -> None:
        self.calls.append(("cdp_ingest_finished", dict(stats)))

    @hookimpl
    def cdp_consent_predicates(self, purpose: str, jurisdiction_column: str) -> pl.Expr | None:
        self.calls.append(("cdp_consent_predicates", {"purpose": purpose}))
        if self.drop_profile is None:
            return None
        return pl.col("profile_id") != self.drop_profile

    @hookimpl
    def cdp_policy_decision(self, job: Any, participant: str) -> PolicyVote | None:
        self.calls.append(("cdp_policy_decision", {"job": job.job_id, "participant": participant}))
        if self.deny_jobs:
            return PolicyVote(False, "fixture denies every job", "fixture.deny")
        return None

    @hookimpl
    def cdp_job_started(self, job: Any, participants: list[str]) -> None:
        self.calls.append(
            ("cdp_job_started", {"job": job.job_id, "participants": list(participants)})
        )

    @hookimpl
    def cdp_round_ended(self, job: Any, round_number: int, metrics: dict[str, Any]) -> None:
        self.calls.append(("cdp_round_ended", {"round": round_number, "metrics": dict(metrics)}))

    @hookimpl
    def cdp_model_published(
        self, job: Any, model_id: str, path: str, lineage: dict[str, Any]
    ) -> None:
        self.calls.append(("cdp_model_published", {"model_id": model_id, "path": path}))

    @hookimpl
    def cdp_score_profile(
        self, profile_id: str, store: Any, model_id: str | None, purpose: str
    ) -> Any:
        self.calls.append(("cdp_score_profile", {"profile_id": profile_id}))
        if profile_id == "fixture-vip":
            return {"profile_id": profile_id, "model_id": "fixture", "score": 1.0}
        return None


class ConstantConnector(Connector):
    """``type: constant``: a tiny in-code source, to show third-party connector registration."""

    type_name = "constant"

    def _source(self) -> pl.LazyFrame:
        return pl.LazyFrame({"profile_id": ["a", "b", "c"], "x": [1.0, 2.0, 3.0], "y": [0, 1, 1]})
