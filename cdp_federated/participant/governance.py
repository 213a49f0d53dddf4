"""A participant's local governance: its own policy, decided locally, recorded in its own audit log.

The coordinator never sees this object; it only learns "refused" and the public reasons. Every
decision (allow or deny, with every rule's outcome), the consent funnel, each round this
participant took part in and the published model go to the participant's hash-chained audit log,
which is checkpointed (signed) when the job ends either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from ..errors import PolicyViolation
from ..governance.audit import (
    BUDGET_CHARGED,
    CONSENT_FILTER,
    JOB_REFUSED,
    JOB_STARTED,
    MODEL_PUBLISHED,
    POLICY_DECISION,
    ROUND_COMMITTED,
    AuditLog,
)
from ..governance.budget import BudgetLedger
from ..governance.engine import DecisionContext, PolicyDecision, evaluate
from ..governance.policy import ConsentRule, Policy
from ..jobs import JobSpec
from ..privacy.dp_fedavg import job_privacy_spend

__all__ = ["LocalGovernance", "decision_context"]


@dataclass
class LocalGovernance:
    """``context`` describes this participant (organisation, region, partners, output use, the
    job's DP epsilon...); ``rows_available`` and ``budget_spent`` are filled in per decision.
    With a ``budget`` ledger, the epsilon already spent by ``source`` in the policy's window is
    read before deciding, and a DP job is charged atomically when it starts (refused, with the
    numbers, if a concurrent job took the budget in between)."""

    policy: Policy
    audit: AuditLog
    context: DecisionContext
    budget: BudgetLedger | None = None
    source: str = ""

    @property
    def participant(self) -> str:
        return self.context.participant

    def decide(
        self, job: JobSpec, *, stage: str, rows_available: int | None = None
    ) -> PolicyDecision:
        """Evaluate the job; record the decision; on deny record the refusal, sign the log and
        raise :class:`~cdp_federated.errors.PolicyViolation` with every failed rule."""
        context = replace(
            self.context,
            rows_available=rows_available,
            budget_spent=self._budget_spent(),
            **_job_dp(job),
        )
        decision = evaluate(self.policy, job, context)
        self.audit.append(POLICY_DECISION, decision.to_dict() | {"stage": stage})
        if not decision.allow:
            self.audit.append(
                JOB_REFUSED,
                {
                    "job_id": job.job_id,
                    "participant": self.participant,
                    "stage": stage,
                    "policy_hash": self.policy.content_hash,
                    "reasons": [f"{r.rule}: {r.message}" for r in decision.failures],
                },
            )
            self.audit.checkpoint()
            decision.raise_if_denied()
        return decision

    def _budget_spent(self) -> float:
        dp = self.policy.privacy.dp
        if self.budget is None or dp is None or dp.budget is None:
            return self.context.budget_spent
        return self.budget.spent(
            self.source or self.participant, dp.budget.window_days, self.context.now
        )

    def consent_rule(self, job: JobSpec) -> ConsentRule:
        return self.policy.purpose_rule(job.purpose)

    def job_started(self, job: JobSpec) -> None:
        """Charge the job's epsilon (when it declares DP and a ledger is kept), then record it."""
        dp = _job_dp(job)
        epsilon = dp.get("dp_epsilon", self.context.dp_epsilon)
        delta = dp.get("dp_delta", self.context.dp_delta)
        if self.budget is not None and epsilon is not None:
            source = self.source or self.participant
            try:
                charge = self.budget.check_and_charge(
                    self.policy, source, job.job_id, epsilon, delta or 0.0, self.context.now
                )
            except PolicyViolation as exc:
                self.audit.append(
                    JOB_REFUSED,
                    {
                        "job_id": job.job_id,
                        "participant": self.participant,
                        "stage": "budget_charge",
                        "policy_hash": self.policy.content_hash,
                        "reasons": list(exc.reasons),
                    },
                )
                self.audit.checkpoint()
                raise
            self.audit.append(
                BUDGET_CHARGED,
                {
                    "job_id": job.job_id,
                    "participant": self.participant,
                    "source": source,
                    "epsilon": charge.epsilon,
                    "delta": charge.delta,
                    "policy_hash": self.policy.content_hash,
                },
            )
        self.audit.append(
            JOB_STARTED,
            {
                "job": job.to_dict(),
                "participant": self.participant,
                "policy_hash": self.policy.content_hash,
            },
        )

    def consent_filtered(
        self, job: JobSpec, *, rows_in: int, consented: int, aligned: int | None, trained: int
    ) -> None:
        self.audit.append(
            CONSENT_FILTER,
            {
                "job_id": job.job_id,
                "participant": self.participant,
                "purpose": job.purpose,
                "policy_hash": self.policy.content_hash,
                "rows_in": rows_in,
                "consented": consented,
                "aligned": aligned,
                "trained": trained,
            },
        )

    def round_committed(self, job: JobSpec, metrics: dict[str, Any], local_rows: int) -> None:
        metrics = dict(metrics)
        loss = metrics.get("train_loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            metrics["train_loss"] = None  # the audit chain admits finite numbers only
        self.audit.append(
            ROUND_COMMITTED,
            {"job_id": job.job_id, "participant": self.participant, "local_rows": local_rows}
            | {
                k: metrics[k]
                for k in ("round", "participants", "failed", "train_loss")
                if k in metrics
            },
        )

    def model_published(self, job: JobSpec, model_id: str, sha256: str, path: str) -> None:
        self.audit.append(
            MODEL_PUBLISHED,
            {
                "job_id": job.job_id,
                "participant": self.participant,
                "model_id": model_id,
                "sha256": sha256,
                "path": path,
                "policy_hash": self.policy.content_hash,
            },
        )

    def close(self) -> dict[str, Any]:
        """Sign the head; returns what the job report shows about this log."""
        checkpoint = self.audit.checkpoint()
        return {
            "entries": checkpoint.entry_seq,
            "head": checkpoint.head_hash,
            "key_id": checkpoint.key_id,
        }


def _job_dp(job: JobSpec) -> dict[str, float]:
    """The DP spend of a job, computed here from its own spec (noise, rounds, sampling rate,
    delta) so the participant never relies on a figure the coordinator states; empty for a job
    without DP (the context's ``dp_epsilon`` then stands, as for jobs from a file)."""
    spend = job_privacy_spend(job)
    return {} if spend is None else {"dp_epsilon": spend.epsilon, "dp_delta": spend.delta}


def decision_context(
    policy: Policy, participant: str, partners: list[str], now: datetime, output_use: str | None
) -> DecisionContext:
    """How this participant describes itself to its own policy: organisation and region from its
    partner entry, the coordinator's region from the coordinator's entry."""
    partner = policy.partner(participant)
    coordinator = next((p for p in policy.partners if "coordinator" in p.roles), None)
    return DecisionContext(
        participant=participant,
        now=now,
        organisation=partner.organisation if partner else None,
        region=partner.region if partner else None,
        coordinator_region=coordinator.region if coordinator else None,
        partners=tuple(partners),
        identity_method=None,  # horizontal: no record linkage between participants
        # secure aggregation: the engine reads the job's own params.secure_aggregation
        output_use=output_use,
    )
