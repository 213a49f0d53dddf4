"""The coordinator's seam to secure aggregation: :func:`secure_sum` drives a
:class:`~.secagg.SecAggServer` over any :class:`~cdp_federated.federation.transport.Transport`
(participants wrapped in :class:`~cdp_federated.participant.secagg_tasks.SecAggTasks`), and
:class:`SecureFitAggregation` turns a round of ``FitIns`` into the FedAvg results a strategy
aggregates, seeing only masked inputs and the sum.

Enabled per job by ``params.secure_aggregation``: ``true``, or a mapping with ``threshold``
(default: a majority of the round's participants), ``bits`` (64), ``frac_bits`` (32) and
``bound`` (the largest magnitude of a weighted parameter or metric, default 1e6).
"""

from __future__ import annotations

import re
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..crypto import shamir
from ..errors import ConfigError, TransportError
from ..federation.codec import Codec
from ..federation.messages import Failure, FitIns, FitRes, Message, SecAggIns, SecAggRes
from ..federation.transport import Transport, undelivered
from ..learning.strategy import FedAvg, Strategy
from .secagg import (
    PAIRWISE,
    SELF,
    Reveal,
    SecAggConfig,
    SecAggServer,
    SecureAggregationAborted,
)
from .secagg_ring import RingEncoder

__all__ = ["SecureSum", "secure_sum", "layout_length", "SecureFitAggregation", "from_params"]

_SIZED = re.compile(r"^(.*)\[(\d+)\]$")


def layout_length(layout: Sequence[str]) -> int:
    """How many ring elements a layout names (``"name[k]"`` is k of them, any other name 1)."""
    return sum(int(m.group(2)) if (m := _SIZED.match(n)) else 1 for n in layout)


@dataclass(frozen=True, eq=False)
class SecureSum:
    """The decoded sum of ``survivors``' inputs (laid out as ``layout``); ``dropped`` maps every
    other participant to the stage and reason it dropped at; ``rejected`` the holders whose
    shares failed their commitments."""

    total: np.ndarray
    layout: tuple[str, ...]
    survivors: tuple[str, ...]
    dropped: Mapping[str, str] = field(default_factory=dict)
    rejected: Mapping[str, str] = field(default_factory=dict)


def secure_sum(
    transport: Transport,
    requests: Mapping[str, Message],
    *,
    job_id: str,
    session: str,
    threshold: int,
    ring: Mapping[str, Any],
    weighting: str = "samples",
    codec: Codec | None = None,
) -> SecureSum:
    """Run one aggregation: each participant runs its ``requests`` task locally and the sum of
    their contributions comes back. Raises :class:`~.secagg.SecureAggregationAborted` when fewer
    than ``threshold`` participants are left at any stage."""
    codec = codec or Codec()
    encoder = RingEncoder(**ring)
    config = SecAggConfig(threshold, session, encoder.bits)
    dropped: dict[str, str] = {}
    base = {"job_id": job_id, "session": session, "threshold": threshold}
    settings = {"ring": dict(ring), "weighting": weighting}

    def ask(stage: str, names: Sequence[str], **fields: Any) -> dict[str, SecAggRes]:
        asked = {
            n: SecAggIns(stage=stage, names=list(names), config=settings, **base, **fields)
            for n in names
        }
        replies = _request_all(transport, asked)
        good = {}
        for name, reply in replies.items():
            if isinstance(reply, SecAggRes) and (reply.session, reply.stage) == (session, stage):
                good[name] = reply
            else:
                dropped[name] = f"{stage}: {_why(reply)}"
        return good

    try:
        # 0. advertise: each participant runs its task and answers with a public key and a layout
        answers = _request_all(
            transport,
            {
                n: SecAggIns(
                    stage="advertise",
                    inner=np.frombuffer(codec.encode(m), dtype=np.uint8).copy(),
                    config=settings,
                    **base,
                )
                for n, m in requests.items()
            },
        )
        keys, layouts = {}, {}
        for name, reply in answers.items():
            if (
                isinstance(reply, SecAggRes)
                and reply.stage == "advertise"
                and reply.session == session
            ):
                key = np.asarray(reply.public_key)
                if key.dtype == np.uint8 and key.shape == (32,):
                    keys[name], layouts[name] = key.tobytes(), tuple(reply.layout)
                    continue
            dropped[name] = f"advertise: {_why(reply)}"
        layout = Counter(layouts.values()).most_common(1)[0][0] if layouts else ()
        for name in [n for n, lay in layouts.items() if lay != layout]:
            dropped[name] = "advertise: its input is laid out differently from the others'"
            del keys[name]
        server = SecAggServer(list(requests), config, layout_length(layout))
        roster = server.receive_keys(keys)

        # 1. share keys: shares go peer to peer through the relay; commitments come here
        names = list(roster)
        key_rows = np.frombuffer(b"".join(roster[n] for n in names), np.uint8).reshape(
            len(names), 32
        )
        commitments = {
            n: _commitments(r, len(names))
            for n, r in ask("share", names, keys=key_rows.copy()).items()
        }
        shared = server.receive_commitments({n: c for n, c in commitments.items() if c is not None})

        # 2. masked inputs, 3. unmasking
        masked = {n: r.masked for n, r in ask("mask", shared).items()}
        survivors = server.receive_masked(masked)
        reveals = {n: _reveals(r) for n, r in ask("unmask", survivors).items()}
        total = server.receive_reveals(reveals)
    except SecureAggregationAborted as exc:  # say who dropped where, not just how many
        gone = "; ".join(f"{n} at {why}" for n, why in sorted(dropped.items())[:5])
        raise SecureAggregationAborted(
            f"{exc.message} (dropped: {gone or 'none'})",
            field=exc.field,
            value=exc.value,
            fix=exc.fix,
            dropped=dict(dropped),
        ) from exc
    for name in requests:
        if name not in survivors and name not in dropped:
            dropped[name] = "refused by the server: malformed answer"
    # a survivor that missed unmasking is still in the sum: only the others dropped out
    dropped = {n: why for n, why in dropped.items() if n not in survivors}
    return SecureSum(
        encoder.decode(total),
        tuple(layout),
        tuple(survivors),
        dict(sorted(dropped.items())),
        dict(server.state.rejected),
    )


def _request_all(transport: Transport, requests: Mapping[str, Message]) -> dict[str, Message]:
    try:
        replies = transport.request_many(dict(sorted(requests.items())))
    except TransportError as exc:
        return {n: undelivered(n, m, exc) for n, m in requests.items()}
    return {
        n: replies.get(n) or undelivered(n, m, TransportError("no reply returned"))
        for n, m in requests.items()
    }


def _why(reply: Message) -> str:
    if isinstance(reply, Failure):
        return f"{reply.error_type}: {reply.message}"
    return f"replied {reply.TYPE}"


def _commitments(reply: SecAggRes, count: int) -> dict[str, dict[int, bytes]] | None:
    table = np.asarray(reply.commitments)
    if table.dtype != np.uint8 or table.shape != (2, count, 32):
        return None
    return {
        kind: {i + 1: table[k, i].tobytes() for i in range(count)}
        for k, kind in enumerate((SELF, PAIRWISE))
    }


def _reveals(reply: SecAggRes) -> list[Reveal]:
    rows = np.asarray(reply.reveals)
    width = shamir.SHARE_BYTES + shamir.SALT_BYTES
    if rows.dtype != np.uint8 or rows.shape != (len(reply.owners), width):
        return []
    if not len(reply.owners) == len(reply.kinds) == len(reply.x):
        return []
    out = []
    for owner, kind, x, row in zip(reply.owners, reply.kinds, reply.x, rows, strict=True):
        raw = row.tobytes()
        y = int.from_bytes(raw[: shamir.SHARE_BYTES], "big")
        out.append(Reveal(owner, kind, shamir.Share(int(x), y, raw[shamir.SHARE_BYTES :])))
    return out


# --- horizontal rounds -----------------------------------------------------------------------------


@dataclass
class SecureFitAggregation:
    """FedAvg rounds through secure aggregation (see the module docstring for the settings);
    ``last`` is the latest round's :class:`SecureSum` (who survived, who dropped where)."""

    job_id: str
    threshold: int | None = None
    bits: int = 64
    frac_bits: int = 32
    bound: float = 1e6
    weighting: str = "samples"
    last: SecureSum | None = None

    def collect_fits(
        self, transport: Transport, requests: Mapping[str, FitIns], round_number: int
    ) -> tuple[dict[str, FitRes], dict[str, Failure]]:
        """The round's results as the strategy expects them: every survivor stands for the
        securely aggregated average (its ``num_examples`` a share of the survivors' total, so
        FedAvg's weighted average of identical vectors is that average), the others as
        failures. No participant's own parameters are ever seen."""
        count = len(requests)
        threshold = self.threshold or count // 2 + 1
        ring = {"bits": self.bits, "frac_bits": self.frac_bits, "bound": self.bound}
        result = secure_sum(
            transport,
            requests,
            job_id=self.job_id,
            # a fresh session per attempt: a round retried after a restart never reuses one
            session=f"{self.job_id}/secagg/round-{round_number}/{secrets.token_hex(8)}",
            threshold=threshold,
            ring={**ring, "parties": count},
            weighting=self.weighting,
        )
        self.last = result
        size = layout_length(result.layout[:1])
        weight = float(result.total[size])
        average = result.total[:size] / weight
        metrics = {
            name.removeprefix("metric:"): float(result.total[size + 1 + i]) / weight
            for i, name in enumerate(result.layout[2:])
        }
        request = next(iter(requests.values()))
        total_examples = float(request.config.get("total_examples") or 0)
        examples = (
            round(weight * total_examples) if self.weighting == "samples" else len(result.survivors)
        )
        base, extra = divmod(max(examples, len(result.survivors)), len(result.survivors))
        results = {
            name: FitRes(average, num_examples=base + (i < extra), metrics=dict(metrics))
            for i, name in enumerate(result.survivors)
        }
        failures = {
            name: Failure(name, "fit", "SecureAggregationDropout", reason)
            for name, reason in result.dropped.items()
        }
        return results, failures


def from_params(
    job_id: str, params: Mapping[str, Any], strategy: Strategy
) -> SecureFitAggregation | None:
    """The job's secure aggregation from ``params.secure_aggregation`` (None when off). Only
    FedAvg and the server optimisers built on it average a sum; robust aggregators need every
    update on its own, which is exactly what secure aggregation hides."""
    value = params.get("secure_aggregation", False)
    if value is False or value is None:
        return None
    weighting = getattr(strategy, "weighting", "samples")
    if _sums_uniformly(strategy):
        weighting = "uniform"
    elif not isinstance(strategy, FedAvg):
        raise ConfigError(
            f"secure aggregation cannot feed the {type(strategy).__name__} strategy",
            field="params.secure_aggregation",
            value=type(strategy).__name__,
            fix="use FedAvg, FedProx, FedAvgM, FedAdam or FedYogi, or turn secure aggregation off",
        )
    if value is True:
        value = {}
    if not isinstance(value, Mapping) or set(value) - {"threshold", "bits", "frac_bits", "bound"}:
        raise ConfigError(
            "params.secure_aggregation is true or a mapping of threshold, bits, frac_bits, bound",
            field="params.secure_aggregation",
            value=value,
            fix="e.g. secure_aggregation: {threshold: 3, bits: 64}",
        )
    return SecureFitAggregation(job_id, weighting=weighting, **dict(value))


def _sums_uniformly(strategy: Strategy) -> bool:
    """DP-FedAvg sums the parties' clipped deltas with uniform weights: the survivors' secure
    average, handed over once per survivor, sums to exactly that (and so do its metrics)."""
    from .dp_fedavg import DPFedAvg  # DP is optional: imported only when asked about

    return isinstance(strategy, DPFedAvg)
