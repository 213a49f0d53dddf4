"""Transport.request_many's default: one request after another, the same replies as ``request``."""

from __future__ import annotations

import numpy as np

from cdp_federated.federation import (
    Failure,
    FitIns,
    FitRes,
    InProcessTransport,
    StatsIns,
    encode,
)

JOB = {"job_id": "j"}


def _fit_ins(value: float) -> FitIns:
    return FitIns(
        job=JOB,
        round=1,
        parameters=np.full(3, value),
        mean=np.zeros(2),
        scale=np.ones(2),
        config={},
    )


def _handler(name: str):
    def handle(message):
        if isinstance(message, StatsIns):
            raise ValueError(f"{name} refuses statistics")
        return FitRes(parameters=message.parameters + len(name), num_examples=len(name))

    return handle


def test_default_request_many_equals_request_for_each_in_request_order():
    calls: list[str] = []
    names = ["bb", "a", "ccc"]
    transport = InProcessTransport(
        {n: _handler(n) for n in names},
        recorder=lambda direction, participant, _: calls.append(f"{direction}:{participant}"),
    )
    requests = {n: _fit_ins(float(i)) for i, n in enumerate(names)}

    replies = transport.request_many(requests)
    one_by_one = {n: transport.request(n, m) for n, m in requests.items()}

    assert list(replies) == names
    assert all(encode(replies[n]) == encode(one_by_one[n]) for n in names)
    assert calls[:6] == [
        "request:bb",
        "reply:bb",
        "request:a",
        "reply:a",
        "request:ccc",
        "reply:ccc",
    ]


def test_default_request_many_turns_undeliverable_requests_into_failures():
    transport = InProcessTransport({"a": _handler("a")})

    replies = transport.request_many({"a": StatsIns(job=JOB), "nobody": _fit_ins(0.0)})

    assert isinstance(replies["a"], Failure) and replies["a"].error_type == "ValueError"
    failure = replies["nobody"]
    assert isinstance(failure, Failure)
    assert (failure.participant, failure.stage, failure.error_type) == (
        "nobody",
        "fit",
        "TransportError",
    )
