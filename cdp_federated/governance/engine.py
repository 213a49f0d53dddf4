"""The decision engine: a participant's policy applied to a job, as a pure function.

:func:`evaluate` does no I/O and reads no clock (``context.now`` is passed in): the same policy, job
and context always give the same :class:`PolicyDecision`. Every rule appears in the decision, passed
or failed, so the audit log records why a job was allowed as well as why one was refused.

The rules, in the order they are reported (each named after the policy field that decides it):

====================================  ==========================================================
``purposes.allowed``                  the job's purpose is permitted
``purposes.lawful_basis``             the job's declared basis (``params.lawful_basis``, if any)
                                      is the policy's; a consent basis needs granting signals
``partners``                          every job participant is a listed partner with the role
                                      ``participant``; this participant's organisation matches
``residency.data_regions``            this participant's data region is permitted
``residency.coordinator_regions``     the coordinator's region is permitted
``features``                          every feature is allowed, not forbidden and not built-in PII
``features.label``                    the label is neither forbidden nor built-in PII
``identity.methods``                  the identity method is permitted; never salted_hash across
                                      organisations
``privacy.secure_aggregation``        secure aggregation when required (the job's
                                      ``params.secure_aggregation`` or the context)
``privacy.dp.epsilon_per_run``        DP when the policy requires it, within epsilon and delta
``privacy.dp.budget``                 spent + this job's epsilon within the window's budget
``minimums.rows_per_party``           enough rows (when the participant has counted them)
``minimums.participants_per_round``   the job's round settings cannot aggregate fewer
``outputs.uses``                      the model's declared use is permitted
====================================  ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from ..errors import BudgetExceededError, ConfigError, PolicyViolation
from ..hookspecs import hookimpl
from ..jobs import JobSpec
from . import PolicyVote
from .policy import Policy, matches_pattern, pii_term, region_matches

__all__ = [
    "BUDGET_RULE",
    "budget_message",
    "DecisionContext",
    "PolicyDecision",
    "PolicyPlugin",
    "Reason",
    "evaluate",
    "policy_plugin",
]

BUDGET_RULE = "privacy.dp.budget"
EPSILON_SLACK = 1e-9  # float slack when comparing sums of epsilons (0.1 + 0.2 fits a 0.3 budget)


def _num(value: float) -> str:
    return repr(round(float(value), 6))  # 7.0 -> "7.0"; 0.1 + 0.2 -> "0.3"


def budget_message(epsilon: float, spent: float, window_days: int, budget: float) -> str:
    """``would spend 2.0 on top of 7.0 spent in the last 30 days; budget 8.0`` (the engine's
    and the ledger's refusal use the same words)."""
    return (
        f"would spend {_num(epsilon)} on top of {_num(spent)} spent in the last {window_days} "
        f"days; budget {_num(budget)}"
    )


@dataclass(frozen=True, kw_only=True)
class DecisionContext:
    """What the participant knows about the job beyond its spec, gathered before deciding.

    ``partners`` names every participant in the job (this one included, or it is added);
    ``region`` is where this participant's data is (default: its ``partners`` entry's region);
    ``budget_spent`` is the epsilon this data source already spent in the policy's budget window
    (from :class:`~cdp_federated.governance.budget.BudgetLedger`); ``now`` is the decision time.
    """

    participant: str
    now: datetime
    organisation: str | None = None
    region: str | None = None
    coordinator_region: str | None = None
    partners: tuple[str, ...] = ()
    identity_method: str | None = None
    secure_aggregation: bool = False
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    rows_available: int | None = None
    budget_spent: float = 0.0
    output_use: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionContext:
        """From a mapping (a job file's ``context:``): ``now`` may be ISO 8601 text (UTC when it
        has no offset); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown context key(s): {', '.join(unknown)}",
                field="context",
                value=unknown[0],
                fix=f"use only {', '.join(sorted(known))}",
            )
        values = dict(data)
        now = values.get("now")
        if isinstance(now, str):
            try:
                now = datetime.fromisoformat(now)
            except ValueError:
                raise ConfigError(
                    "context.now is not ISO 8601", field="context.now", value=now
                ) from None
        if not isinstance(now, datetime):
            raise ConfigError(
                "context.now is required", field="context.now", fix="e.g. 2026-10-31T00:00:00Z"
            )
        values["now"] = now if now.tzinfo else now.replace(tzinfo=UTC)
        values["partners"] = tuple(values.get("partners") or ())
        return cls(**values)


@dataclass(frozen=True)
class Reason:
    """One rule's outcome: ``ok`` passed or failed, and why, with the numbers."""

    rule: str
    ok: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "ok": self.ok, "message": self.message}


@dataclass(frozen=True)
class PolicyDecision:
    """Allow or deny, with every rule evaluated, and the policy's identity (name, version, hash)."""

    allow: bool
    reasons: tuple[Reason, ...]
    policy_name: str
    policy_version: int
    policy_hash: str
    job_id: str = ""
    participant: str = ""
    decided_at: datetime | None = field(default=None)

    @property
    def failures(self) -> tuple[Reason, ...]:
        return tuple(r for r in self.reasons if not r.ok)

    def to_dict(self) -> dict[str, Any]:
        """For the audit log and ``--json``: ``policy``, ``version``, ``policy_hash``, ``allow``,
        ``reasons`` (``rule``, ``ok``, ``message``), plus ``job_id``, ``participant`` and
        ``decided_at``."""
        return {
            "policy": self.policy_name,
            "version": self.policy_version,
            "policy_hash": self.policy_hash,
            "allow": self.allow,
            "reasons": [r.to_dict() for r in self.reasons],
            "job_id": self.job_id,
            "participant": self.participant,
            "decided_at": self.decided_at.isoformat() if self.decided_at else None,
        }

    def raise_if_denied(self) -> None:
        """PolicyViolation listing every failed rule; BudgetExceededError when the privacy budget
        is the only rule that failed (the job may run once the window frees budget)."""
        failed = self.failures
        if not failed:
            return
        reasons = tuple(f"{r.rule}: {r.message}" for r in failed)
        kwargs: dict[str, Any] = {
            "reasons": reasons,
            "field": failed[0].rule,
            "value": self.job_id or None,
        }
        head = (
            f"policy {self.policy_name!r} v{self.policy_version} ({self.policy_hash[:12]}) "
            f"refuses job {self.job_id!r} for {self.participant!r}"
        )
        if all(r.rule == BUDGET_RULE for r in failed):
            raise BudgetExceededError(
                f"{head}: {reasons[0]}",
                fix="wait until earlier charges leave the window, or lower the job's epsilon",
                **kwargs,
            )
        raise PolicyViolation(
            f"{head}: {'; '.join(reasons)}",
            fix="change the job (purpose, features, partners, privacy settings) or the policy",
            **kwargs,
        )


# --- Rules -----------------------------------------------------------------------------------------


def _names(values: tuple[str, ...] | list[str]) -> str:
    return ", ".join(values) if values else "(none)"


def _purpose(policy: Policy, job: JobSpec, ctx: DecisionContext) -> Reason:
    rule = "purposes.allowed"
    if job.purpose in policy.purposes.allowed:
        return Reason(rule, True, f"purpose {job.purpose!r} is allowed")
    return Reason(
        rule,
        False,
        f"purpose {job.purpose!r} is not allowed (allowed: {_names(policy.purposes.allowed)})",
    )


def _lawful_basis(policy: Policy, job: JobSpec, ctx: DecisionContext) -> Reason:
    rule, basis = "purposes.lawful_basis", policy.purposes.lawful_basis
    declared = job.params.get("lawful_basis")
    if declared is not None and declared != basis:
        return Reason(
            rule,
            False,
            f"the job declares lawful basis {declared!r} but this policy relies on {basis!r}",
        )
    entry = policy.consent.get(job.purpose)
    if entry is None:
        return Reason(rule, False, f"no consent rule maps purpose {job.purpose!r} to signals")
    if basis == "consent":
        if not entry.signals and entry.tcf is None:
            return Reason(
                rule, False, f"basis 'consent' but no signal can grant purpose {job.purpose!r}"
            )
        granting = list(entry.signals)
        if entry.tcf is not None:
            granting.append(f"TCF purposes {list(entry.tcf.purposes)}")
        default = (
            f" (in {_names(policy.consent.opt_out)}: unless a signal denies)"
            if policy.consent.opt_out
            else ""
        )
        return Reason(rule, True, f"consent: rows need a grant from {_names(granting)}{default}")
    return Reason(
        rule,
        True,
        f"{basis}: rows are used unless a signal denies "
        f"({_names(list(entry.signals + entry.opt_out_signals))})",
    )


def _job_partners(ctx: DecisionContext) -> tuple[str, ...]:
    return tuple(dict.fromkeys((ctx.participant, *ctx.partners)))


def _partners(policy: Policy, job: JobSpec, ctx: DecisionContext) -> Reason:
    rule, problems = "partners", []
    for name in _job_partners(ctx):
        partner = policy.partner(name)
        if partner is None:
            problems.append(f"{name} is not a listed partner")
        elif "participant" not in partner.roles:
            problems.append(
                f"{name} may not take part as participant (roles: {_names(partner.roles)})"
            )
    me = policy.partner(ctx.participant)
    if me is not None and ctx.organisation is not None and ctx.organisation != me.organisation:
        problems.append(
            f"{ctx.participant} belongs to {me.organisation!r} in the policy, not {ctx.organisation!r}"
        )
    if problems:
        return Reason(rule, False, "; ".join(problems))
    names = _job_partners(ctx)
    return Reason(rule, True, f"every participant is a listed partner: {_names(names)}")


def _residency(policy: Policy, job: JobSpec, ctx: DecisionContext) -> Reason:
    rule, allowed = "residency.data_regions", policy.residency.data_regions
    me = policy.partner(ctx.participant)
    declared = me.region if me is not None else None
    region = ctx.region or declared
    if region is None:
        return Reason(rule, False, f"{ctx.participant}'s data region is unknown")
    if (
        declared is not None
        and ctx.region is not None
        and not (region_matches(ctx.region, (declared,)) or region_matches(declared, (ctx.region,)))
    ):
        return Reason(
            rule,
            False,
            f"{ctx.participant}'s data is in {ctx.region!r} but the policy lists it in {declared!r}",
        )
    if region_matches(region, allowed):
        return Reason(rule, True, f"data region {region!r} is allowed ({_names(allowed)})")
    return Reason(
        rule, False, f"data region {region!r} is not allowed (allowed: {_names(allowed)})"
    )


def _coordinator(policy: Policy, job: JobSpec, ctx: DecisionContext) -> Reason:
    rule, allowed = "residency.coordinator_regions", policy.residency.coordinator_regions
    if ctx.coordinator_region is None:
        return Reason(
            rule, False, f"the coordinator's region is unknown (allowed: {_names(allowed)})"
        )
    if region_matches(ctx.coordinator_region, allowed):
        return Reason(rule, True, f"coordinator region {ctx.coordinator_region!r} is allowed")
    return Reason(
        rule,
        False,
        f"coordinator region {ctx.coordinator_region!r} is not allowed (allowed: {_names(allowed)})",
    )


def _column_problem(policy: Policy, column: str, *, check_allowed: bool) -> str | None:
    term = pii_term(column)
    if term is not None:
        return f"{column} is built-in PII ({term})"
    forbidden = next((p for p in policy.features.forbidden if matches_pattern(column, p)), None)
    if forbidden is not None:
        return f"{column} is forbidden by features.forbidden ({forbidden})"
    if check_allowed and not any(matches_pattern(column, p) for p in policy.features.allowed):
        return f"{column} is not in features.allowed"
    return None


def _features(policy: Policy, job: JobSpec, ctx: DecisionContext) -> Reason:
    problems = [
        p for c in job.features if (p := _column_problem(policy, c, check_allowed=True)) is not None
    ]
    if problems:
        return Reason("features", False, "; ".join(problems))
    return Reason("features", True, f"{len(job.features)} features allowed: {_names(job.features)}")


def _label(policy: Policy, job: JobSpec, ctx: DecisionContext) -> Reason:
    problem = _column_problem(policy, job.label, check_allowed=False)
    if problem is not None:
        return Reason("features.label", False, f"label {problem}")
    return Reason("features.label", True, f"label {job.label} is neither PII nor forbidden")


def _identity(policy: Policy, job: JobSpec, ctx: DecisionContext) -> Reason:
    rule, method, allowed = "identity.methods", ctx.identity_method, policy.identity.methods
    if method is None:
        if job.kind == "vertical":
            return Reason(rule, False, "a vertical job needs an identity method")
        return Reason(rule, True, f"no identity alignment in this {job.kind} job")
    problems = []
    if method not in allowed:
        problems.append(f"{method} is not an allowed identity method (allowed: {_names(allowed)})")
    if method == "salted_hash":
        organisations = {ctx.organisation} if ctx.organisation else set()
        unknown = []
        for name in _job_partners(ctx):
            partner = policy.partner(name)
            if partner is None:
                unknown.append(name)
            else:
                organisations.add(partner.organisation)
        if len(organisations) > 1 or unknown:
            spans = ", ".join(sorted(organisations))
            who = f"spans organisations {spans}" if len(organisations) > 1 else ""
            if unknown:
                who += "; " if who else ""
                who += f"includes partners of unknown organisation: {', '.join(unknown)}"
            problems.append(
                f"salted_hash refused: the job {who}. A salted hash shared across organisations "
                "lets any holder of the salt hash a dictionary of likely emails and phone numbers "
                "and re-identify the other parties' customers (dictionary attack); use psi"
            )
    if problems:
        return Reason(rule, False, "; ".join(problems))
    return Reason(rule, True, f"identity method {method} is allowed")


def _uses_secure_aggregation(job: JobSpec, ctx: DecisionContext) -> bool:
    return ctx.secure_aggregation or job.params.get("secure_aggregation") not in (None, False)


def _secure_aggregation(policy: Policy, job: JobSpec, ctx: DecisionContext) -> Reason:
    rule, setting = "privacy.secure_aggregation", policy.privacy.secure_aggregation
    uses = _uses_secure_aggregation(job, ctx)
    if setting == "required" and not uses:
        return Reason(rule, False, "secure aggregation is required but the job does not use it")
    used = "uses" if uses else "does not use"
    return Reason(rule, True, f"secure aggregation is {setting}; the job {used} it")


def _dp(policy: Policy, job: JobSpec, ctx: DecisionContext) -> Reason:
    rule, dp = "privacy.dp.epsilon_per_run", policy.privacy.dp
    if dp is None:
        extra = f" (the job uses epsilon {ctx.dp_epsilon})" if ctx.dp_epsilon is not None else ""
        return Reason(rule, True, f"the policy requires no differential privacy{extra}")
    if ctx.dp_epsilon is None:
        return Reason(
            rule,
            False,
            f"differential privacy is required (epsilon <= {dp.epsilon_per_run}, delta <= "
            f"{dp.delta}) but the job declares none",
        )
    delta = ctx.dp_delta if ctx.dp_delta is not None else 0.0
    problems = []
    if not ctx.dp_epsilon > 0 or not math.isfinite(ctx.dp_epsilon):
        problems.append(f"epsilon {ctx.dp_epsilon} is not a positive number")
    elif ctx.dp_epsilon > dp.epsilon_per_run + EPSILON_SLACK:
        problems.append(f"epsilon {ctx.dp_epsilon} exceeds epsilon_per_run {dp.epsilon_per_run}")
    if delta > dp.delta:
        problems.append(f"delta {delta:g} exceeds {dp.delta:g}")
    if problems:
        return Reason(rule, False, "; ".join(problems))
    return Reason(
        rule,
        True,
        f"epsilon {ctx.dp_epsilon} <= {dp.epsilon_per_run} and delta {delta:g} <= {dp.delta:g}",
    )


def _budget(policy: Policy, job: JobSpec, ctx: DecisionContext) -> Reason:
    dp = policy.privacy.dp
    if dp is None or dp.budget is None:
        return Reason(BUDGET_RULE, True, "the policy sets no privacy budget")
    budget = dp.budget
    if ctx.dp_epsilon is None:
        return Reason(
            BUDGET_RULE,
            False,
            f"the job declares no epsilon, so its spend cannot be charged ({_num(ctx.budget_spent)} "
            f"spent in the last {budget.window_days} days; budget {_num(budget.epsilon)})",
        )
    text = budget_message(ctx.dp_epsilon, ctx.budget_spent, budget.window_days, budget.epsilon)
    total = ctx.budget_spent + ctx.dp_epsilon
    if total > budget.epsilon + EPSILON_SLACK:
        return Reason(BUDGET_RULE, False, text)
    left = _num(max(0.0, budget.epsilon - total))
    return Reason(BUDGET_RULE, True, f"{text.replace('would spend', 'spends', 1)}; {left} left")


def _rows(policy: Policy, job: JobSpec, ctx: DecisionContext) -> Reason:
    rule, minimum = "minimums.rows_per_party", policy.minimums.rows_per_party
    if ctx.rows_available is None:
        return Reason(rule, True, f"not yet counted; at least {minimum} rows are needed to train")
    if ctx.rows_available < minimum:
        return Reason(rule, False, f"{ctx.rows_available} rows, fewer than the minimum {minimum}")
    return Reason(rule, True, f"{ctx.rows_available} rows >= minimum {minimum}")


def _round_size(policy: Policy, job: JobSpec, ctx: DecisionContext) -> Reason:
    """What the job declares about its smallest round; the participant enforces the roster size
    itself under secure aggregation (``SecAggTasks(min_participants=...)``)."""
    rule, minimum = "minimums.participants_per_round", policy.minimums.participants_per_round
    if minimum is None:
        return Reason(rule, True, "the policy sets no minimum number of participants per round")
    params, problems = job.params, []
    partners = _job_partners(ctx)
    if len(partners) < minimum:
        problems.append(f"the job has {len(partners)} participants")
    for key in ("min_fit_participants", "clients_per_round"):
        value = params.get(key)
        if isinstance(value, int) and value < minimum:
            problems.append(f"params.{key} is {value}")
    secagg = params.get("secure_aggregation")
    threshold = secagg.get("threshold") if isinstance(secagg, Mapping) else None
    if isinstance(threshold, int) and threshold < minimum:
        problems.append(f"the secure-aggregation threshold is {threshold}")
    fraction, floor = params.get("fraction_fit", 1), params.get("min_fit_participants")
    if (
        isinstance(fraction, int | float)
        and fraction < 1
        and not (isinstance(floor, int) and floor >= minimum)
    ):
        problems.append(
            f"participants are sampled (fraction_fit {fraction}) with no "
            f"params.min_fit_participants >= {minimum}"
        )
    if problems:
        return Reason(
            rule, False, f"a round may aggregate fewer than {minimum}: {'; '.join(problems)}"
        )
    return Reason(rule, True, f"every round aggregates at least {minimum} participants")


def _output(policy: Policy, job: JobSpec, ctx: DecisionContext) -> Reason:
    rule, uses = "outputs.uses", policy.outputs.uses
    if ctx.output_use is None:
        return Reason(rule, False, f"the job declares no output use (permitted: {_names(uses)})")
    if ctx.output_use in uses:
        return Reason(
            rule,
            True,
            f"output use {ctx.output_use!r} is permitted; retain at most "
            f"{policy.outputs.retention_days} days",
        )
    return Reason(rule, False, f"output use {ctx.output_use!r} is not permitted ({_names(uses)})")


_RULES: tuple[Callable[[Policy, JobSpec, DecisionContext], Reason], ...] = (
    _purpose,
    _lawful_basis,
    _partners,
    _residency,
    _coordinator,
    _features,
    _label,
    _identity,
    _secure_aggregation,
    _dp,
    _budget,
    _rows,
    _round_size,
    _output,
)


def evaluate(policy: Policy, job: JobSpec, context: DecisionContext) -> PolicyDecision:
    """Apply every rule of ``policy`` to ``job`` as seen by ``context.participant``. Pure."""
    reasons = tuple(rule(policy, job, context) for rule in _RULES)
    return PolicyDecision(
        allow=all(r.ok for r in reasons),
        reasons=reasons,
        policy_name=policy.name,
        policy_version=policy.version,
        policy_hash=policy.content_hash,
        job_id=job.job_id,
        participant=context.participant,
        decided_at=context.now,
    )


# --- Plugin ----------------------------------------------------------------------------------------


class PolicyPlugin:
    """A pluggy plugin voting with one participant's local policy (see :func:`policy_plugin`)."""

    def __init__(
        self,
        policy: Policy,
        context_factory: Callable[[JobSpec, str], DecisionContext | None],
        on_decision: Callable[[PolicyDecision], None] | None = None,
    ) -> None:
        self.policy = policy
        self.context_factory = context_factory
        self.on_decision = on_decision

    @hookimpl
    def cdp_policy_decision(self, job: JobSpec, participant: str) -> PolicyVote | None:
        context = self.context_factory(job, participant)
        if context is None:
            return None  # not a participant this policy governs: abstain
        decision = evaluate(self.policy, job, context)
        if self.on_decision is not None:
            self.on_decision(decision)
        tag = f"policy:{self.policy.name}@{self.policy.short_hash}"
        if decision.allow:
            return PolicyVote(True, f"all {len(decision.reasons)} rules passed", tag)
        failed = "; ".join(f"{r.rule}: {r.message}" for r in decision.failures)
        return PolicyVote(False, failed, tag)


def policy_plugin(
    policy: Policy,
    context_factory: Callable[[JobSpec, str], DecisionContext | None],
    *,
    on_decision: Callable[[PolicyDecision], None] | None = None,
) -> PolicyPlugin:
    """A plugin implementing ``cdp_policy_decision`` with ``policy``; register it with the
    participant's plugin manager. ``context_factory(job, participant)`` builds the
    :class:`DecisionContext` (or returns None to abstain, e.g. for another participant sharing an
    in-process plugin manager); ``on_decision`` receives every decision, e.g. to append it to the
    audit log."""
    return PolicyPlugin(policy, context_factory, on_decision)
