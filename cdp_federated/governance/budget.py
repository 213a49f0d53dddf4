"""The privacy budget ledger: epsilon charged per data source, as immutable rows.

A participant decides with the spend it read (:meth:`BudgetLedger.spent` -> ``DecisionContext.
budget_spent``) and charges the job with :meth:`BudgetLedger.check_and_charge` just before it
releases anything computed with noise. That call checks and writes in one transaction holding a
per-source lock (PostgreSQL: ``pg_advisory_xact_lock(hashtext(source))``; SQLite: the database write
lock, taken up front with ``BEGIN IMMEDIATE``), so two jobs racing for the last of a budget cannot
both win, and it refuses before writing anything.

A job is charged once per source: charging the same ``(source, job_id)`` again returns the existing
row (a retried round or a resumed coordinator does not spend twice), and a different epsilon or
delta for the same job is an error. The window is ``(now - window_days, now]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Row, func, select

from ..errors import BudgetExceededError, ConfigError, PolicyViolation
from ..store import Store, schema
from .engine import BUDGET_RULE, EPSILON_SLACK, budget_message
from .policy import Policy

__all__ = ["BudgetCharge", "BudgetLedger"]

_SOURCE_MAX = schema.privacy_budget.c.source.type.length
_JOB_MAX = schema.privacy_budget.c.job_id.type.length


@dataclass(frozen=True)
class BudgetCharge:
    """One ledger row; ``created`` is False when the job had already been charged."""

    source: str
    job_id: str
    policy_hash: str
    epsilon: float
    delta: float
    spent_at: datetime
    created: bool = True


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ConfigError("now needs a timezone", field="now", value=now, fix="pass a UTC datetime")
    return now.astimezone(UTC)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _check_args(source: str, job_id: str, epsilon: float, delta: float) -> None:
    for name, value, limit in (("source", source, _SOURCE_MAX), ("job_id", job_id, _JOB_MAX)):
        if not isinstance(value, str) or not value or (limit and len(value) > limit):
            raise ConfigError(
                f"{name} must be a non-empty string of at most {limit} characters",
                field=name,
                value=value,
            )
    if not isinstance(epsilon, int | float) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ConfigError("epsilon must be a positive number", field="epsilon", value=epsilon)
    if not isinstance(delta, int | float) or not 0 <= delta < 1:
        raise ConfigError("delta must be in [0, 1)", field="delta", value=delta)


class BudgetLedger:
    """Privacy spend per data source in ``store``'s ``privacy_budget`` table."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def spent(self, source: str, window_days: int, now: datetime) -> float:
        """Epsilon charged to ``source`` in ``(now - window_days, now]``."""
        with self.store.engine.connect() as conn:
            return self._spent(conn, source, window_days, _utc(now))

    def charges(self, source: str | None = None) -> list[BudgetCharge]:
        """Every charge (of ``source``), oldest first."""
        t = schema.privacy_budget
        query = select(t).order_by(t.c.spent_at, t.c.id)
        if source is not None:
            query = query.where(t.c.source == source)
        with self.store.engine.connect() as conn:
            return [self._row(r, created=False) for r in conn.execute(query)]

    def charge(
        self,
        source: str,
        job_id: str,
        policy_hash: str,
        epsilon: float,
        delta: float,
        now: datetime,
    ) -> BudgetCharge:
        """Record ``epsilon``/``delta`` spent by ``job_id`` on ``source`` at ``now``, without
        checking any budget (see :meth:`check_and_charge`). Idempotent per (source, job_id)."""
        _check_args(source, job_id, epsilon, delta)
        now = _utc(now)
        with self._locked(source) as conn:
            existing = self._existing(conn, source, job_id, epsilon, delta)
            if existing is not None:
                return existing
            return self._insert(conn, source, job_id, policy_hash, epsilon, delta, now)

    def check_and_charge(
        self,
        policy: Policy,
        source: str,
        job_id: str,
        epsilon: float,
        delta: float,
        now: datetime,
    ) -> BudgetCharge:
        """Charge the job when ``policy`` allows it, atomically; refuse before writing otherwise.

        PolicyViolation when epsilon or delta exceed the policy's per-run limits;
        BudgetExceededError (with ``spent``, ``budget`` and ``window_days`` in its context) when
        the window's spend plus ``epsilon`` would exceed the budget. A job already charged returns
        its existing row.
        """
        _check_args(source, job_id, epsilon, delta)
        now = _utc(now)
        dp = policy.privacy.dp
        if dp is not None:
            problems = []
            if epsilon > dp.epsilon_per_run + EPSILON_SLACK:
                problems.append(f"epsilon {epsilon} exceeds epsilon_per_run {dp.epsilon_per_run}")
            if delta > dp.delta:
                problems.append(f"delta {delta:g} exceeds {dp.delta:g}")
            if problems:
                raise PolicyViolation(
                    f"policy {policy.name!r} refuses the charge of job {job_id!r}: "
                    + "; ".join(problems),
                    reasons=tuple(f"privacy.dp.epsilon_per_run: {p}" for p in problems),
                    field="privacy.dp.epsilon_per_run",
                    value=epsilon,
                    fix="lower the job's epsilon/delta",
                )
        with self._locked(source) as conn:
            existing = self._existing(conn, source, job_id, epsilon, delta)
            if existing is not None:
                return existing
            if dp is not None and dp.budget is not None:
                budget = dp.budget
                spent = self._spent(conn, source, budget.window_days, now)
                if spent + epsilon > budget.epsilon + EPSILON_SLACK:
                    text = budget_message(epsilon, spent, budget.window_days, budget.epsilon)
                    raise BudgetExceededError(
                        f"privacy budget of {source!r} exceeded by job {job_id!r}: {text}",
                        reasons=(f"{BUDGET_RULE}: {text}",),
                        field=BUDGET_RULE,
                        value=epsilon,
                        fix="wait until earlier charges leave the window, or lower the epsilon",
                        source=source,
                        spent=spent,
                        budget=budget.epsilon,
                        window_days=budget.window_days,
                    )
            return self._insert(conn, source, job_id, policy.content_hash, epsilon, delta, now)

    # --- internals ---------------------------------------------------------------------------------

    @contextmanager
    def _locked(self, source: str) -> Iterator[Connection]:
        """A transaction holding ``source``'s budget lock, committed when the block succeeds."""
        with self.store.writer() as conn, conn.begin():  # SQLite: BEGIN IMMEDIATE (write lock)
            if self.store.dialect == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(func.hashtext(source))))
            yield conn

    @staticmethod
    def _spent(conn: Connection, source: str, window_days: int, now: datetime) -> float:
        t = schema.privacy_budget
        since = now - timedelta(days=window_days)
        total = conn.execute(
            select(func.coalesce(func.sum(t.c.epsilon), 0.0)).where(
                t.c.source == source, t.c.spent_at > since, t.c.spent_at <= now
            )
        ).scalar_one()
        return float(total)

    def _existing(
        self, conn: Connection, source: str, job_id: str, epsilon: float, delta: float
    ) -> BudgetCharge | None:
        t = schema.privacy_budget
        row = conn.execute(select(t).where(t.c.source == source, t.c.job_id == job_id)).first()
        if row is None:
            return None
        charge = self._row(row, created=False)
        same = math.isclose(charge.epsilon, epsilon, rel_tol=1e-12) and math.isclose(
            charge.delta, delta, rel_tol=1e-12, abs_tol=1e-300
        )
        if not same:
            raise ConfigError(
                f"job {job_id!r} was already charged epsilon {charge.epsilon} (delta "
                f"{charge.delta:g}) on {source!r}; a job is charged once per source",
                field="epsilon",
                value=epsilon,
                fix="charge a new run under a new job_id",
            )
        return charge

    @staticmethod
    def _insert(
        conn: Connection,
        source: str,
        job_id: str,
        policy_hash: str,
        epsilon: float,
        delta: float,
        now: datetime,
    ) -> BudgetCharge:
        conn.execute(
            schema.privacy_budget.insert().values(
                source=source,
                job_id=job_id,
                policy_hash=policy_hash,
                epsilon=float(epsilon),
                delta=float(delta),
                spent_at=now,
            )
        )
        return BudgetCharge(source, job_id, policy_hash, float(epsilon), float(delta), now)

    @staticmethod
    def _row(row: Row, *, created: bool) -> BudgetCharge:
        return BudgetCharge(
            row.source,
            row.job_id,
            row.policy_hash,
            float(row.epsilon),
            float(row.delta),
            _aware(row.spent_at),
            created,
        )
