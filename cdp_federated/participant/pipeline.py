"""A participant's local pipeline up to the training matrix: policy, connector, consent, split.

Order matters: governance decides before any row is read; the consent filter runs inside the
scan (pushed down into SQL where the ledger shares the source's database); the funnel records the
rows at each step for the audit trail and the job report.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import pluggy
import polars as pl

from ..connector import JURISDICTION, PROFILE_ID, Connector, ScanRequest
from ..consent.ledger import allowed_ids
from ..consent.purposes import ConsentRuleLike
from ..errors import PolicyViolation
from ..governance import combine_votes
from ..jobs import JobSpec
from ..store import Store

__all__ = ["Funnel", "check_policy", "load_consented", "split_train_test"]


@dataclass(frozen=True)
class Funnel:
    rows_in: int
    consented: int

    def to_dict(self, trained: int | None = None) -> dict[str, int]:
        out = {"rows_in": self.rows_in, "consented": self.consented}
        if trained is not None:
            out["trained"] = trained
        return out


def check_policy(pm: pluggy.PluginManager, job: JobSpec, participant: str) -> None:
    """Ask every plugin; any deny refuses the job with all reasons (before any data is read)."""
    decision = combine_votes(pm.hook.cdp_policy_decision(job=job, participant=participant))
    if not decision.allow:
        raise PolicyViolation(
            f"participant {participant!r} refuses job {job.job_id!r}: {'; '.join(decision.reasons)}",
            reasons=decision.reasons,
            field="job",
            value=job.job_id,
            fix="change the job (purpose, features, partners) or the participant's policy",
        )


def load_consented(
    connector: Connector,
    *,
    pm: pluggy.PluginManager,
    purpose: str,
    at: datetime,
    ledger: Store | None,
    rule: ConsentRuleLike | None = None,
) -> tuple[pl.DataFrame, Funnel]:
    """Rows whose consent allows ``purpose`` at ``at``: the ledger's allowed ids (when this
    participant keeps a ledger) ANDed with every plugin's predicate. Without a ledger only the
    plugins' predicates apply, so a participant must run a consent plugin or keep a ledger.
    ``rule`` is the participant's policy's consent rule (default: the built-in one for
    ``purpose``)."""
    # Counted separately so the funnel shows what consent removed (a second, count-only read).
    rows_in = connector.scan().select(pl.len()).collect().item()
    predicates = tuple(
        p
        for p in pm.hook.cdp_consent_predicates(purpose=purpose, jurisdiction_column=JURISDICTION)
        if p is not None
    )
    request = ScanRequest(
        allowed_ids=allowed_ids(ledger, purpose, at, rule=rule) if ledger is not None else None,
        predicates=predicates,
    )
    frame = connector.scan(request).collect()
    return frame, Funnel(rows_in=rows_in, consented=frame.height)


def split_train_test(
    frame: pl.DataFrame, test_fraction: float, *, salt: str = ""
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Deterministic customer-level split: a profile is in the test set when the SHA-256 of its id
    falls in the first ``test_fraction`` of the hash space (stable across runs and versions)."""
    ids = frame[PROFILE_ID].to_list()
    cut = int(test_fraction * 2**32)
    is_test = [
        int.from_bytes(hashlib.sha256((salt + pid).encode()).digest()[:4], "big") < cut
        for pid in ids
    ]
    mask = pl.Series("is_test", is_test, dtype=pl.Boolean)
    return frame.filter(~mask), frame.filter(mask)
