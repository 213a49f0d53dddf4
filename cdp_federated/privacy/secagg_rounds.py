"""The coordinator's seam to secure aggregation: :func:`secure_sum` drives a
:class:`~.secagg.SecAggServer` over any :class:`~cdp_federated.federation.transport.Transport`
(participants wrapped in :class:`~cdp_federated.participant.secagg_tasks.SecAggTasks`), and
:class:`SecureFitAggregation` turns a round of ``FitIns`` into the FedAvg results a strategy
aggregates, seeing only masked inputs and the sum.

Enabled per job by ``params.secure_aggregation``: ``true``, or a mapping with ``threshold``
(default: a majority of the round's participants), ``bits`` (64), ``frac_bits`` (32),
``bound`` (the largest magnitude of a weighted parameter or metric, default 1e6) and
``compression_scale`` (the first round's quantisation scale, see below).

Compression inside the ring (``params.compression: int8|int4``): a participant sends, instead
of ``w * parameters`` in the 64-bit ring, stochastic codes of its weighted *update*
``w * (parameters - global)`` quantised with a scale the coordinator announces for the round
(the same for everyone, so codes sum), summed in the narrowest ring that the participants'
codes cannot wrap (:func:`~.secagg_ring.code_ring_bits`: 2^16 for 20 parties at 8 bits); weight
and metrics stay fixed-point in the 64-bit ring next to them. The scale of round r + 1 is
``1.5 * sqrt(sum_k (w_k max|update_k|)^2)`` of round r, itself a secure sum (at least every
party's peak, so nothing is clipped unless updates grow by more than half); the first round uses
``compression_scale`` when given, else runs uncompressed in the 64-bit ring to learn it.
Top-k is refused: parties keep different coordinates, which do not sum.
"""

from __future__ import annotations

import dataclasses
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
from .compression import parse_compression
from .secagg import (
    PAIRWISE,
    SELF,
    Reveal,
    SecAggConfig,
    SecAggServer,
    SecureAggregationAborted,
)
from .secagg_ring import QuantisedRing, RingEncoder

__all__ = [
    "SecureSum",
    "secure_sum",
    "layout_length",
    "quantised_ring",
    "SecureFitAggregation",
    "from_params",
]

_SIZED = re.compile(r"^(.*)\[(\d+)\]$")


def layout_length(layout: Sequence[str]) -> int:
    """How many ring elements a layout names (``"name[k]"`` is k of them, any other name 1)."""
    return sum(int(m.group(2)) if (m := _SIZED.match(n)) else 1 for n in layout)


def quantised_ring(
    quantise: Mapping[str, Any], layout: Sequence[str], extras: RingEncoder
) -> QuantisedRing:
    """The in-ring compression both ends derive from the round's ``quantise`` settings
    (``bits``, ``scale``: not None) and an input's ``layout`` (its first entry is coded)."""
    return QuantisedRing(
        code_bits=int(quantise["bits"]),
        scale=float(quantise["scale"]),
        size=layout_length(layout[:1]),
        extras=extras,
        count=layout_length(layout[1:]),
    )


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
    quantise: Mapping[str, Any] | None = None,
    codec: Codec | None = None,
) -> SecureSum:
    """Run one aggregation: each participant runs its ``requests`` task locally and the sum of
    their contributions comes back. ``quantise`` (``bits``, ``scale``) sums the first entry of
    the layout as shared-scale codes in a narrow ring (:func:`quantised_ring`). Raises
    :class:`~.secagg.SecureAggregationAborted` when fewer than ``threshold`` participants are
    left at any stage."""
    codec = codec or Codec()
    encoder = RingEncoder(**ring)
    dropped: dict[str, str] = {}
    base = {"job_id": job_id, "session": session, "threshold": threshold}
    settings: dict[str, Any] = {"ring": dict(ring), "weighting": weighting}
    if quantise is not None:  # scale None: no codes yet, only the peaks for the next round
        scale = quantise["scale"]
        settings["quantise"] = {
            "bits": int(quantise["bits"]),
            "scale": None if scale is None else float(scale),
        }

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
        frames: dict[int, np.ndarray] = {}  # one encoding per distinct request object
        for message in requests.values():
            if id(message) not in frames:
                frames[id(message)] = np.frombuffer(codec.encode(message), dtype=np.uint8)
        answers = _request_all(
            transport,
            {
                n: SecAggIns(stage="advertise", inner=frames[id(m)], config=settings, **base)
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
        coding = quantise is not None and quantise["scale"] is not None
        coded = quantised_ring(settings["quantise"], layout, encoder) if coding else None
        config = SecAggConfig(
            threshold, session, encoder.bits, coded.segments if coded is not None else ()
        )
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
        encoder.decode(total) if coded is None else coded.decode(total, len(survivors)),
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
    compression_bits: int = 0  # 8 or 4: codes summed in a narrow ring (module docstring)
    compression_scale: float | None = None  # the next round's shared scale, when known
    clipped: float = 0.0  # the latest compressed round's mean fraction of clipped coordinates

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
        request = next(iter(requests.values()))
        quantise = None
        if self.compression_bits:
            # the agent replies uncompressed: the update is quantised once, in the ring
            flagged: dict[int, FitIns] = {}  # one copy per distinct request: encoded once
            for r in requests.values():
                if id(r) not in flagged:
                    flagged[id(r)] = dataclasses.replace(r, config={**r.config, IN_RING: True})
            requests = {n: flagged[id(r)] for n, r in requests.items()}
            # codes are of updates from one global vector, which decoding adds back
            same = all(np.array_equal(r.parameters, request.parameters) for r in requests.values())
            scale = self.compression_scale if same else None
            quantise = {"bits": self.compression_bits, "scale": scale}
        result = secure_sum(
            transport,
            requests,
            job_id=self.job_id,
            # a fresh session per attempt: a round retried after a restart never reuses one
            session=f"{self.job_id}/secagg/round-{round_number}/{secrets.token_hex(8)}",
            threshold=threshold,
            ring={**ring, "parties": count},
            weighting=self.weighting,
            quantise=quantise,
        )
        self.last = result
        values = dict(_entries(result))
        first = result.layout[0]
        weight = float(values["weight"][0])
        average = values[first] / weight
        if first.startswith("update["):  # coded updates: the global parameters are added back
            average = np.asarray(request.parameters, dtype=np.float64) + average
        if "stat:peak2" in values:  # the next round's scale, from this round's peaks
            scale = np.float32(SCALE_MARGIN * np.sqrt(max(values["stat:peak2"][0], 0.0)))
            # all-zero updates (or a scale float32 cannot hold): the next round goes uncompressed
            self.compression_scale = float(scale) if 0 < scale < np.inf else None
            self.clipped = float(values["stat:clipped"][0]) / len(result.survivors)
        metrics = {
            name.removeprefix("metric:"): float(v[0]) / weight
            for name, v in values.items()
            if name.startswith("metric:")
        }
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


def _entries(result: SecureSum) -> list[tuple[str, np.ndarray]]:
    """The layout's names with their slices of the sum (``"name[k]"`` has k values)."""
    out, start = [], 0
    for name in result.layout:
        stop = start + layout_length([name])
        out.append((name, result.total[start:stop]))
        start = stop
    return out


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
    if not isinstance(value, Mapping) or set(value) - _SETTINGS:
        raise ConfigError(
            "params.secure_aggregation is true or a mapping of "
            + ", ".join(sorted(_SETTINGS, key=len)),
            field="params.secure_aggregation",
            value=value,
            fix="e.g. secure_aggregation: {threshold: 3, bits: 64}",
        )
    value = dict(value)
    scheme = parse_compression(params.get("compression"), block=params.get("compression_block"))
    if scheme.scheme == "topk":
        raise ConfigError(
            "top-k updates cannot be summed under secure aggregation: each party keeps "
            "different coordinates",
            field="params.compression",
            value=params.get("compression"),
            fix="use int8 or int4 with secure aggregation (quantised inside the ring)",
        )
    scale = value.pop("compression_scale", None)
    if scale is not None and not (
        isinstance(scale, int | float) and not isinstance(scale, bool) and 0 < scale < np.inf
    ):
        raise ConfigError(
            "the first round's compression scale must be a positive number",
            field="params.secure_aggregation.compression_scale",
            value=scale,
            fix="a bound on each party's weighted update coordinates, e.g. 0.05; or leave it "
            "out and the first round runs uncompressed",
        )
    if scheme.bits:
        value |= {"compression_bits": scheme.bits, "compression_scale": scale}
    return SecureFitAggregation(job_id, weighting=weighting, **dict(value))


_SETTINGS = {"threshold", "bits", "frac_bits", "bound", "compression_scale"}
SCALE_MARGIN = 1.5  # room for updates to grow from one round to the next before clipping
IN_RING = "compression_in_ring"  # FitIns.config flag: reply uncompressed, SecAggTasks quantises


def _sums_uniformly(strategy: Strategy) -> bool:
    """DP-FedAvg sums the parties' clipped deltas with uniform weights: the survivors' secure
    average, handed over once per survivor, sums to exactly that (and so do its metrics)."""
    from .dp_fedavg import DPFedAvg  # DP is optional: imported only when asked about

    return isinstance(strategy, DPFedAvg)
