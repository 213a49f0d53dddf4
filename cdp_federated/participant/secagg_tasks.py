"""The participant's side of secure aggregation: :class:`SecAggTasks` wraps a participant's
handler (``ParticipantAgent.handle``), serves :class:`~cdp_federated.federation.messages.SecAggIns`
stages with a :class:`~cdp_federated.privacy.secagg.SecAggClient`, and passes every other request
through untouched.

At ``advertise`` it runs the wrapped task (a ``FitIns``) locally, turns the reply into a vector
(:func:`fit_contribution`), encodes it into the ring and answers with its public key only: the
plaintext reply never leaves. Shares go to the peers sealed through the relay
(``channel_for(job_id)`` gives the participant's :class:`~cdp_federated.federation.relay.RelayChannel`:
:func:`in_process_channels` inside one process, :func:`~.relay.http_relay_channel` over HTTP).

>>> handlers = with_secure_aggregation({n: agent.handle for n, agent in agents.items()})
>>> run_horizontal(job, InProcessTransport(handlers))   # job.params.secure_aggregation: true
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..crypto import shamir
from ..errors import PolicyViolation, ProtocolError
from ..federation.codec import Codec
from ..federation.envelope import RelayKeyPair
from ..federation.messages import (
    FitIns,
    FitRes,
    GBMHistogramIns,
    GBMHistogramRes,
    Message,
    SecAggIns,
    SecAggRes,
    SecAggShare,
)
from ..federation.relay import InProcessRelay, RelayChannel
from ..privacy.compression import expand_fit_reply
from ..privacy.dp_fedavg import CLIP_KEY
from ..privacy.secagg import PAIRWISE, SELF, Reveal, SecAggClient, SecAggConfig, SharePacket
from ..privacy.secagg_ring import RingEncoder
from ..privacy.secagg_rounds import quantised_ring

__all__ = [
    "SecAggTasks",
    "Contribution",
    "fit_contribution",
    "histogram_contribution",
    "task_contribution",
    "in_process_channels",
    "with_secure_aggregation",
    "packet_to_wire",
    "packet_from_wire",
]

# (inner request, its local reply, the round's secagg config) -> (values to sum, their layout)
Contribution = Callable[[Message, Message, Mapping[str, Any]], tuple[np.ndarray, list[str]]]
_SHARE_WIDTH = shamir.SHARE_BYTES + shamir.SALT_BYTES


def fit_contribution(
    request: Message, reply: Message, config: Mapping[str, Any]
) -> tuple[np.ndarray, list[str]]:
    """A FedAvg contribution: ``w * parameters``, ``w`` and ``w * metric`` for each numeric
    metric, with ``w = num_examples / total_examples`` (``weighting="samples"``) or 1 (uniform),
    so the sum divided by the summed ``w`` is the weighted average FedAvg computes.

    When the job compresses (``config["quantise"]``), two statistics close the layout, for the
    coordinator's next scale: ``stat:peak2``, the square of the largest coordinate of the
    weighted update ``w * (parameters - global)``, and ``stat:clipped``, the fraction of them
    over this round's scale (each only ever seen summed over the participants); when the round
    has a scale, that weighted update replaces ``w * parameters`` as the first entry
    (``update[d]``, coded in a narrow ring)."""
    if not isinstance(request, FitIns):
        raise ProtocolError(
            "secure aggregation of this task is not supported",
            field="inner",
            value=request.TYPE,
            fix="aggregate fit_ins",
        )
    if not isinstance(reply, FitRes):  # a compressed update is expanded locally first
        reply = expand_fit_reply("self", reply, request.parameters)
    if not isinstance(reply, FitRes):
        raise ProtocolError("the local task did not produce parameters", field="reply")
    total = float(request.config.get("total_examples") or reply.num_examples)
    weight = reply.num_examples / total if config.get("weighting", "samples") == "samples" else 1.0
    names = sorted(
        k
        for k, v in reply.metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    )
    theta = np.asarray(reply.parameters, dtype=np.float64)
    metrics = [weight * float(reply.metrics[k]) for k in names]
    tail = ["weight", *(f"metric:{k}" for k in names)]
    quantise = config.get("quantise")
    if not quantise:
        values = np.concatenate([weight * theta, [weight], metrics])
        return values, [f"parameters[{theta.size}]", *tail]
    update = weight * (theta - np.asarray(request.parameters, dtype=np.float64))
    peak = float(np.abs(update).max()) if update.size else 0.0
    stats, names = [peak * peak, 0.0], ["stat:peak2", "stat:clipped"]
    if quantise["scale"] is None:  # no shared scale yet: this round is summed uncompressed
        values = np.concatenate([weight * theta, [weight], metrics, stats])
        return values, [f"parameters[{theta.size}]", *tail, *names]
    stats[1] = float(np.mean(np.abs(update) > float(np.float32(quantise["scale"]))))
    values = np.concatenate([update, [weight], metrics, stats])
    return values, [f"update[{theta.size}]", *tail, *names]


def histogram_contribution(
    request: Message, reply: Message, config: Mapping[str, Any]
) -> tuple[np.ndarray, list[str]]:
    """A GBM level's contribution: this participant's gradient then hessian histograms, flat
    (``grad[k]``, ``hess[k]``), checked against the request first (the coordinator cannot
    check one participant's histograms any more: it sees only the sum)."""
    if not isinstance(request, GBMHistogramIns) or not isinstance(reply, GBMHistogramRes):
        raise ProtocolError("the local task did not produce histograms", field="reply")
    if (
        (reply.tree, reply.depth) != (request.tree, request.depth)
        or not np.array_equal(reply.nodes, request.build_nodes)
        or reply.grad.shape != reply.hess.shape
        or reply.grad.shape[:2] != (request.build_nodes.size, request.features.size)
        or not (reply.hess >= 0).all()
    ):
        raise ProtocolError(
            "the local histograms do not answer the level asked for",
            field="gbm_histogram_res",
            value=[reply.tree, reply.depth, list(reply.grad.shape)],
        )
    grad = np.asarray(reply.grad, dtype=np.float64).ravel()
    hess = np.asarray(reply.hess, dtype=np.float64).ravel()
    return np.concatenate([grad, hess]), [f"grad[{grad.size}]", f"hess[{hess.size}]"]


def task_contribution(
    request: Message, reply: Message, config: Mapping[str, Any]
) -> tuple[np.ndarray, list[str]]:
    """The contribution of whichever task the round wraps: FedAvg fits or GBM histograms."""
    if isinstance(request, GBMHistogramIns):
        return histogram_contribution(request, reply, config)
    return fit_contribution(request, reply, config)


def packet_to_wire(packet: SharePacket, session: str) -> SecAggShare:
    rows = [_share_bytes(packet.self_share), _share_bytes(packet.key_share)]
    shares = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(2, _SHARE_WIDTH)
    return SecAggShare(session, packet.owner, packet.holder, packet.x, shares.copy())


def packet_from_wire(message: Message, session: str) -> SharePacket:
    if (
        not isinstance(message, SecAggShare)
        or message.session != session
        or message.shares.shape != (2, _SHARE_WIDTH)
        or message.shares.dtype != np.uint8
    ):
        raise ProtocolError("a malformed share packet", field="secagg_share", value=session)
    return SharePacket(
        message.owner,
        message.holder,
        message.x,
        _share(message.x, message.shares[0].tobytes()),
        _share(message.x, message.shares[1].tobytes()),
    )


def _share_bytes(share: shamir.Share) -> bytes:
    return share.y_bytes() + share.salt


def _share(x: int, raw: bytes) -> shamir.Share:
    return shamir.Share(
        x, int.from_bytes(raw[: shamir.SHARE_BYTES], "big"), raw[-shamir.SALT_BYTES :]
    )


def _ring(config: Mapping[str, Any]) -> RingEncoder:
    settings = config.get("ring")
    if not isinstance(settings, dict) or set(settings) != {"bits", "frac_bits", "bound", "parties"}:
        raise ProtocolError(
            "the ring settings are missing or malformed",
            field="config.ring",
            value=settings,
            fix="send bits, frac_bits, bound and parties",
        )
    return RingEncoder(**settings)


def _quantise(config: Mapping[str, Any]) -> dict[str, Any] | None:
    settings = config.get("quantise")
    if settings is None:
        return None
    if (
        not isinstance(settings, dict)
        or set(settings) != {"bits", "scale"}
        or settings["bits"] not in (4, 8)
        or not isinstance(settings["scale"], int | float | None)
    ):
        raise ProtocolError(
            "the in-ring compression settings are malformed",
            field="config.quantise",
            value=settings,
            fix="send bits (4 or 8) and a positive scale (or none: peaks only)",
        )
    return settings


@dataclass
class _Session:
    client: SecAggClient
    job_id: str


class SecAggTasks:
    """Serve secure-aggregation stages for participant ``name`` around ``handler``.

    ``timeout`` bounds the wait for a peer's share packet at the masked-input stage; a missing
    one makes this participant drop out of the round (the others go on). One aggregation per job
    is kept in memory: a participant that restarts mid-round has dropped out of it.

    The participant's policy, enforced here rather than trusted to the coordinator: with
    ``require_secure`` a bare ``FitIns`` or ``GBMHistogramIns`` (an update or histograms in
    the clear) is refused; with ``min_participants`` it sits out (raises
    :class:`PolicyViolation`) any stage whose roster is smaller, so its key shares, masked
    input and reveals never serve a smaller sum."""

    def __init__(
        self,
        name: str,
        handler: Callable[[Message], Message],
        channel_for: Callable[[str], RelayChannel],
        *,
        contribution: Contribution = task_contribution,
        timeout: float = 30.0,
        codec: Codec | None = None,
        require_secure: bool = False,
        min_participants: int = 0,
    ) -> None:
        self.name = name
        self._require_secure = require_secure
        self._min_participants = min_participants
        self._handler = handler
        self._channel_for = channel_for
        self._contribution = contribution
        self._timeout = timeout
        self._codec = codec or Codec()
        self._sessions: dict[str, _Session] = {}

    def handle(self, message: Message) -> Message:
        if not isinstance(message, SecAggIns):
            if self._require_secure and isinstance(message, FitIns | GBMHistogramIns):
                raise PolicyViolation(
                    "this participant's policy requires secure aggregation: it sends no update "
                    "in the clear",
                    field="privacy.secure_aggregation",
                    value="required",
                    fix="run the job with params.secure_aggregation: true",
                )
            return self._handler(message)
        if message.stage != "advertise" and len(message.names) < self._min_participants:
            raise PolicyViolation(
                f"the {message.stage} stage has {len(message.names)} participants, fewer than "
                f"this participant's minimum {self._min_participants}",
                field="minimums.participants_per_round",
                value=len(message.names),
                fix="run rounds with more participants",
            )
        if message.stage == "advertise":
            return self._advertise(message)
        session = self._sessions.get(message.session)
        if session is None:
            raise ProtocolError(
                "no secure aggregation in progress for this session",
                field="session",
                value=message.session,
                fix="this participant restarted or never advertised: it sits the round out",
            )
        if message.stage == "share":
            return self._share(message, session)
        if message.stage == "mask":
            return self._mask(message, session)
        if message.stage == "unmask":
            del self._sessions[message.session]  # answered once, whatever happens
            return self._unmask(message, session)
        raise ProtocolError("unknown secure-aggregation stage", field="stage", value=message.stage)

    def _advertise(self, message: SecAggIns) -> SecAggRes:
        inner = self._codec.decode(np.asarray(message.inner, dtype=np.uint8).tobytes())
        if isinstance(inner, SecAggIns):
            raise ProtocolError("a secure aggregation cannot wrap another", field="inner")
        ring = _ring(message.config)
        quantise = _quantise(message.config)
        reply = self._handler(inner)
        values, layout = self._contribution(inner, reply, message.config)
        self._channel_for(message.job_id)  # publishes the relay key before peers seal to it
        if quantise is None or quantise["scale"] is None:
            config = SecAggConfig(message.threshold, message.session, ring.bits)
            vector = ring.encode(values)
        else:  # codes in the narrowest ring that cannot wrap, extras in the 64-bit one
            coded = quantised_ring(quantise, layout, ring)
            config = SecAggConfig(message.threshold, message.session, ring.bits, coded.segments)
            # under DP the decoded update must stay within the clip norm the noise assumes
            clip = inner.config.get(CLIP_KEY) if isinstance(inner, FitIns) else None
            vector = coded.encode(values, norm_bound=None if clip is None else float(clip))
        client = SecAggClient(self.name, vector, config)
        # an abandoned aggregation of the same job is over: forget its secrets
        for name in [s for s, v in self._sessions.items() if v.job_id == message.job_id]:
            del self._sessions[name]
        self._sessions[message.session] = _Session(client, message.job_id)
        key = np.frombuffer(client.advertise(), dtype=np.uint8).copy()
        return SecAggRes(message.session, "advertise", public_key=key, layout=layout)

    def _share(self, message: SecAggIns, session: _Session) -> SecAggRes:
        keys = np.asarray(message.keys, dtype=np.uint8)
        if keys.shape != (len(message.names), 32):
            raise ProtocolError("the roster's keys are malformed", field="keys", value=keys.shape)
        roster = {n: keys[i].tobytes() for i, n in enumerate(message.names)}
        packets, commitments = session.client.share_keys(roster)
        channel = self._channel_for(session.job_id)
        for holder, packet in sorted(packets.items()):
            channel.send(holder, packet_to_wire(packet, message.session), message.session)
        order = sorted(roster)
        table = [[commitments[kind][i + 1] for i in range(len(order))] for kind in (SELF, PAIRWISE)]
        digests = np.frombuffer(b"".join(b"".join(row) for row in table), dtype=np.uint8)
        return SecAggRes(
            message.session, "share", commitments=digests.reshape(2, len(order), 32).copy()
        )

    def _mask(self, message: SecAggIns, session: _Session) -> SecAggRes:
        channel = self._channel_for(session.job_id)
        packets = {
            peer: packet_from_wire(
                channel.receive(peer, message.session, self._timeout), message.session
            )
            for peer in message.names
            if peer != self.name
        }
        masked = session.client.masked_input(message.names, packets)
        return SecAggRes(message.session, "mask", masked=masked)

    def _unmask(self, message: SecAggIns, session: _Session) -> SecAggRes:
        reveals: list[Reveal] = session.client.unmask(message.names)
        rows = b"".join(_share_bytes(r.share) for r in reveals)
        return SecAggRes(
            message.session,
            "unmask",
            owners=[r.owner for r in reveals],
            kinds=[r.kind for r in reveals],
            x=[r.share.x for r in reveals],
            reveals=np.frombuffer(rows, dtype=np.uint8).reshape(len(reveals), _SHARE_WIDTH).copy(),
        )


def in_process_channels(
    participants: Iterable[str], **options: Any
) -> Mapping[str, Callable[[str], RelayChannel]]:
    """For simulations: per participant, ``channel_for(job_id)``, each job over its own
    :class:`InProcessRelay` with fresh relay keys (created on first use, thread-safe)."""
    names = sorted(participants)
    lock = threading.Lock()
    relays: dict[str, InProcessRelay] = {}
    channels: dict[tuple[str, str], RelayChannel] = {}

    def factory(name: str) -> Callable[[str], RelayChannel]:
        def channel_for(job_id: str) -> RelayChannel:
            with lock:
                if (name, job_id) not in channels:
                    relay = relays.setdefault(job_id, InProcessRelay(names, **options))
                    channels[(name, job_id)] = relay.channel(name, RelayKeyPair.generate())
                return channels[(name, job_id)]

        return channel_for

    return {name: factory(name) for name in names}


def with_secure_aggregation(
    handlers: Mapping[str, Callable[[Message], Message]], **options: Any
) -> dict[str, Callable[[Message], Message]]:
    """In-process participants (simulations): each handler wrapped in :class:`SecAggTasks`
    over a shared :class:`InProcessRelay` per job; ``options`` go to :class:`SecAggTasks`."""
    channels = in_process_channels(handlers)
    return {n: SecAggTasks(n, h, channels[n], **options).handle for n, h in handlers.items()}
