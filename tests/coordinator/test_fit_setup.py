"""The fit setup (job spec, mean, scale, preconditioner) travels once per participant and job;
a participant that lost it gets it again, and governance still guards every request."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cdp_federated import hookimpl
from cdp_federated.coordinator import run_horizontal
from cdp_federated.errors import (
    ConfigError,
    PolicyViolation,
    SetupRequiredError,
    TrainingError,
)
from cdp_federated.federation import FitIns, InProcessTransport, StatsIns, decode
from cdp_federated.federation.messages import setup_digest
from cdp_federated.governance import PolicyVote
from cdp_federated.participant import ParticipantAgent
from tests.test_horizontal_run import FEATURES, make_job, make_parties, provider

ROUNDS = 6


@pytest.fixture(scope="module")
def parties():
    return make_parties()


def _transport(parties, *, swap=None, recorder=None) -> InProcessTransport:
    handlers = {name: ParticipantAgent(name, provider(f)).handle for name, f in parties.items()}
    if swap:
        handlers = {name: swap(name, handler) for name, handler in handlers.items()}
    return InProcessTransport(handlers, recorder=recorder)


def _full_request(parties, job) -> FitIns:
    """A valid full FitIns for ``job`` (moments from a throwaway run's first request)."""
    frames: list = []
    run_horizontal(
        replace(job, rounds=1), _transport(parties, recorder=lambda *f: frames.append(f))
    )
    return next(
        decode(f) for direction, _, f in frames if direction == "request" and b'"fit_ins"' in f
    )


def test_a_restarted_participant_gets_the_setup_again_and_the_model_is_unchanged(parties):
    job = make_job(rounds=ROUNDS)
    baseline = run_horizontal(job, _transport(parties))
    asked: list[tuple[str, int, bool]] = []

    def swap(name, handler):
        state = {"handle": handler}

        def handle(message):
            if isinstance(message, FitIns):
                asked.append((name, message.round, message.is_short))
                if name == "uk" and message.round == 3 and message.is_short:
                    # A restart: a fresh agent that holds no setup and has read no row yet.
                    state["handle"] = ParticipantAgent(name, provider(parties[name])).handle
            return state["handle"](message)

        return handle

    result = run_horizontal(job, _transport(parties, swap=swap))

    np.testing.assert_array_equal(result.parameters, baseline.parameters)
    assert [r.failures for r in result.history] == [{}] * ROUNDS
    uk = [(r, short) for name, r, short in asked if name == "uk"]
    assert uk == [(1, False), (2, True), (3, True), (3, False), (4, True), (5, True), (6, True)]
    others = [short for name, r, short in asked if name != "uk" and r > 1]
    assert others and all(others)


def test_a_short_request_to_an_agent_without_the_setup_is_refused(parties):
    full = _full_request(parties, make_job(rounds=1))
    short = replace(
        full,
        job={"job_id": full.job["job_id"]},
        mean=np.zeros(0),
        scale=np.zeros(0),
        preconditioner=np.zeros(0),
    )
    assert short.is_short
    agent = ParticipantAgent("uk", provider(parties["uk"]))
    with pytest.raises(SetupRequiredError) as err:
        agent.handle(short)
    assert err.value.field == "setup"
    agent.handle(full)  # now it holds the setup
    assert agent.handle(short).parameters.shape == (len(FEATURES) + 1,)
    with pytest.raises(SetupRequiredError):  # another job's name is not this setup
        agent.handle(replace(short, job={"job_id": "another-job"}))


def test_a_setup_that_does_not_match_its_name_is_refused(parties):
    full = _full_request(parties, make_job(rounds=1))
    assert full.setup == setup_digest(full.job, full.mean, full.scale, full.preconditioner)
    agent = ParticipantAgent("uk", provider(parties["uk"]))
    tampered = replace(full, mean=full.mean + 1.0)
    with pytest.raises(TrainingError, match="does not match its name") as err:
        agent.handle(tampered)
    assert err.value.field == "setup"


class _DenyAfterSwitch:
    """Denies job ``horizontal-test`` once ``deny`` is set."""

    deny = False

    @hookimpl
    def cdp_policy_decision(self, job, participant):
        if self.deny and job.job_id == "horizontal-test":
            return PolicyVote(False, "withdrawn", "partners")
        return None


def test_governance_is_asked_again_when_a_short_request_returns_to_a_job(pm, parties):
    full = _full_request(parties, make_job(rounds=1))
    short = replace(
        full,
        job={"job_id": full.job["job_id"]},
        mean=np.zeros(0),
        scale=np.zeros(0),
        preconditioner=np.zeros(0),
    )
    policy = _DenyAfterSwitch()
    pm.register(policy)
    agent = ParticipantAgent("uk", provider(parties["uk"]), pm=pm)
    agent.handle(full)
    other = replace(make_job(rounds=1), job_id="other-job").to_dict()
    agent.handle(StatsIns(job=other))  # the agent serves another job in between
    policy.deny = True
    with pytest.raises(PolicyViolation, match="withdrawn"):
        agent.handle(short)


def test_evaluate_train_false_scores_only_the_test_split(parties):
    job = make_job(rounds=2, evaluate_train=False)
    result = run_horizontal(job, _transport(parties))
    assert set(result.evaluations) == {"test"}
    both = run_horizontal(make_job(rounds=2), _transport(parties))
    assert set(both.evaluations) == {"test", "train"}
    assert result.auc == both.auc
    with pytest.raises(ConfigError, match="evaluate_train"):
        run_horizontal(make_job(rounds=2, evaluate_train="no"), _transport(parties))
