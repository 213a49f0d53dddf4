"""InProcessTransport: every message crosses the codec both ways; failures come back as Failure."""

from __future__ import annotations

import numpy as np
import pytest

from cdp_federated.errors import CodecError, TransportError
from cdp_federated.federation import (
    Codec,
    Failure,
    FitIns,
    FitRes,
    InProcessTransport,
    StatsIns,
    Transport,
    decode,
)

JOB = {"job_id": "j"}


def fit_ins(parameters=None) -> FitIns:
    return FitIns(
        job=JOB,
        round=1,
        parameters=np.zeros(3) if parameters is None else parameters,
        mean=np.zeros(2),
        scale=np.ones(2),
        config={"C": 1.0},
    )


def echo_plus_one(message):
    return FitRes(parameters=message.parameters + 1.0, num_examples=5, metrics={"loss": 0.5})


def test_round_trips_both_directions_through_the_codec_and_records_every_frame():
    frames = []
    seen = []

    def handler(message):
        seen.append(message)
        return echo_plus_one(message)

    transport = InProcessTransport(
        {"b": handler, "a": handler}, recorder=lambda *f: frames.append(f)
    )
    request = fit_ins()
    reply = transport.request("a", request)

    assert isinstance(transport, Transport)
    assert transport.participants() == ["a", "b"]
    assert seen[0] is not request  # the handler got a decoded copy, not the caller's object
    assert not seen[0].parameters.flags.writeable
    np.testing.assert_array_equal(reply.parameters, [1.0, 1.0, 1.0])
    assert [(d, p) for d, p, _ in frames] == [("request", "a"), ("reply", "a")]
    assert all(isinstance(frame, bytes) for _, _, frame in frames)
    assert decode(frames[1][2]).num_examples == 5


def test_a_raising_handler_becomes_a_failure_reply_on_the_wire():
    frames = []

    def broken(message):
        raise ValueError("column 'x' is missing")

    transport = InProcessTransport({"eu": broken}, recorder=lambda *f: frames.append(f))
    reply = transport.request("eu", StatsIns(job=JOB))

    assert isinstance(reply, Failure)
    assert (reply.participant, reply.stage, reply.error_type) == ("eu", "stats", "ValueError")
    assert "column 'x' is missing" in reply.message
    assert isinstance(decode(frames[-1][2]), Failure)


def test_a_reply_the_codec_refuses_becomes_a_failure():
    def poisons(message):
        return FitRes(parameters=np.array([np.nan, 0.0, 0.0]), num_examples=1)

    def not_a_message(message):
        return {"parameters": [1, 2, 3]}

    transport = InProcessTransport({"bad": poisons, "odd": not_a_message})
    nan_reply = transport.request("bad", fit_ins())
    odd_reply = transport.request("odd", fit_ins())

    assert isinstance(nan_reply, Failure) and nan_reply.error_type == "CodecError"
    assert "fit_res.parameters" in nan_reply.message
    assert isinstance(odd_reply, Failure) and odd_reply.error_type == "TypeError"


def test_unknown_participant_is_a_transport_error():
    transport = InProcessTransport({"a": echo_plus_one})
    with pytest.raises(TransportError, match="unknown participant") as info:
        transport.request("zz", fit_ins())
    assert info.value.value == "zz" and "a" in info.value.fix


def test_a_request_the_codec_refuses_raises_on_the_coordinator_side():
    transport = InProcessTransport({"a": echo_plus_one})
    with pytest.raises(CodecError):
        transport.request("a", fit_ins(np.array([np.inf, 0.0, 0.0])))


def test_the_codec_limits_apply_to_in_process_traffic():
    transport = InProcessTransport({"a": echo_plus_one}, codec=Codec(max_elements=10))
    with pytest.raises(CodecError, match="too many"):
        transport.request("a", fit_ins(np.zeros(20)))
