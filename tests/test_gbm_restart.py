"""A GBM participant that restarts mid-job (its in-memory state lost) is caught up by the
coordinator and the job ends with the uninterrupted run's trees; the catch-up carries the model
and the edges, nothing per row; malformed catch-ups are typed errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest

from cdp_federated.coordinator.gbm_runner import run_horizontal_gbm
from cdp_federated.errors import CodecError, SetupRequiredError, TrainingError
from cdp_federated.federation import InProcessTransport, decode, encode
from cdp_federated.federation.messages import (
    GBMCatchUpIns,
    GBMCatchUpRes,
    GBMHistogramIns,
    GBMHistogramRes,
    SecAggIns,
)
from cdp_federated.participant import ParticipantAgent
from cdp_federated.participant.secagg_tasks import SecAggTasks, in_process_channels
from tests.learning.test_gbm_core import assert_same_trees, heap_trees
from tests.test_horizontal_gbm import make_job, make_parties

ENSEMBLE_ARRAYS = ("feature", "threshold", "threshold_bin", "left", "right", "value", "roots")


class Restarting:
    """Handlers for every party; ``victim`` is replaced by a fresh agent (nothing kept: a
    process restart) just before it gets the histogram request for ``at`` = (tree, depth)."""

    def __init__(
        self, parties, *, victim="uk", at=None, consent_gate=None, secure=False, stage="advertise"
    ):
        self.parties, self.victim, self.at, self.stage = parties, victim, at, stage
        self.consent_gate, self.secure = consent_gate, secure
        self.channels = in_process_channels(parties) if secure else None
        self.restarts = 0
        self.broken_catch_up = False
        self.handlers = {name: self._fresh(name) for name in parties}

    def _fresh(self, name):
        frames = self.parties[name]
        agent = ParticipantAgent(
            name, lambda job, split: frames[split], consent_gate=self.consent_gate
        )
        if not self.secure:
            return agent.handle
        return SecAggTasks(name, agent.handle, self.channels[name]).handle

    def _inner(self, message):
        if isinstance(message, GBMHistogramIns):
            return message
        stage, inner = getattr(message, "stage", None), getattr(message, "inner", None)
        if stage == "advertise" and inner is not None:
            return decode(np.asarray(inner, dtype=np.uint8).tobytes())
        return None

    def transport(self, recorder=None) -> InProcessTransport:
        def handle(message, name):
            inner = self._inner(message)
            if self.stage == "advertise":
                due = isinstance(inner, GBMHistogramIns) and (inner.tree, inner.depth) == self.at
            else:  # a later stage of the level's secure aggregation: the session names the level
                level = f"/tree-{self.at[0]}/depth-{self.at[1]}/"
                due = getattr(message, "stage", None) == self.stage and level in message.session
            if name == self.victim and due and not self.restarts:
                self.restarts += 1
                self.handlers[name] = self._fresh(name)
            if self.broken_catch_up and isinstance(message, GBMCatchUpIns):
                raise RuntimeError("disk full")
            return self.handlers[name](message)

        return InProcessTransport(
            {n: (lambda m, n=n: handle(m, n)) for n in self.parties}, recorder=recorder
        )


def assert_identical(a, b) -> None:
    for name in ENSEMBLE_ARRAYS:
        np.testing.assert_array_equal(getattr(a.ensemble, name), getattr(b.ensemble, name))
    assert a.ensemble.base_score == b.ensemble.base_score


@pytest.mark.parametrize("at", [(0, 1), (1, 0), (2, 2)], ids=["mid-tree", "new-tree", "deep"])
def test_a_restarted_participant_catches_up_and_the_model_is_the_uninterrupted_one(at):
    parties = make_parties()
    job = make_job(rounds=4, subsample=0.7, colsample=0.75)
    reference = run_horizontal_gbm(job, Restarting(parties).transport())
    frames: list = []
    restarting = Restarting(parties, at=at)
    result = run_horizontal_gbm(job, restarting.transport(lambda *f: frames.append(f)))
    assert restarting.restarts == 1
    assert_identical(result, reference)
    assert result.evaluations["test"].auc == reference.evaluations["test"].auc
    # one catch-up, to uk alone, acknowledged; then the level was asked of uk again
    sent = [(p, decode(f)) for d, p, f in frames if d == "request"]
    catch_ups = [(p, m) for p, m in sent if isinstance(m, GBMCatchUpIns)]
    assert [(p, m.tree, m.depth) for p, m in catch_ups] == [("uk", *at)]
    asked = [p for p, m in sent if isinstance(m, GBMHistogramIns) and (m.tree, m.depth) == at]
    assert sorted(asked) == ["eu", "uk", "uk", "us"]
    acks = [decode(f) for d, p, f in frames if d == "reply" and p == "uk"]
    assert sum(isinstance(m, GBMCatchUpRes) for m in acks) == 1


def test_the_catch_up_carries_the_model_and_edges_nothing_per_row():
    parties = make_parties()
    job = make_job(rounds=4, max_depth=3)
    frames: list = []
    result = run_horizontal_gbm(
        job, Restarting(parties, at=(3, 1)).transport(lambda *f: frames.append(f))
    )
    (message,) = [
        m for d, _, f in frames if d == "request" and isinstance(m := decode(f), GBMCatchUpIns)
    ]
    trees = heap_trees(result.ensemble)
    # finished trees 0-2 in full, plus tree 3's root split (decided at depth 0)
    assert message.split_counts.tolist() == [len(t["splits"]) for t in trees[:3]] + [1]
    assert message.leaf_counts.tolist() == [len(t["leaves"]) for t in trees[:3]]
    for t, tree in enumerate(trees[:3]):
        start = int(message.split_counts[:t].sum())
        got = zip(
            message.split_nodes[start:].tolist(),
            message.split_features[start:].tolist(),
            message.split_bins[start:].tolist(),
            strict=False,
        )
        assert {n: (f, b) for n, f, b in list(got)[: len(tree["splits"])]} == tree["splits"]
    assert message.edges.size == sum(e.size for e in result.edges)
    rows = {f[s].height for f in parties.values() for s in f}
    sizes = [
        getattr(message, a.name).size
        for a in dataclasses.fields(message)
        if isinstance(getattr(message, a.name), np.ndarray)
    ]
    assert max(sizes) <= message.edges.size + 32 and not set(sizes) & rows
    assert set(message.job) == set(job.to_dict())  # the job spec, as every request carries


@pytest.mark.parametrize("stage", ["advertise", "share", "mask"])
def test_secure_aggregation_reruns_the_level_after_the_catch_up(stage):
    # advertise: restarted before the level began; share/mask: after it advertised in the
    # level's session (the new process has no secret of it), before anything was unmasked
    parties = make_parties()
    job = make_job(rounds=3, secure_aggregation=True)
    plain: list = []
    reference = run_horizontal_gbm(
        job, Restarting(parties, secure=True).transport(lambda *f: plain.append(f))
    )
    frames: list = []
    restarting = Restarting(parties, at=(1, 1), secure=True, stage=stage)
    result = run_horizontal_gbm(job, restarting.transport(lambda *f: frames.append(f)))
    assert restarting.restarts == 1
    assert_identical(result, reference)  # fixed point: the same sums, whatever the masks
    replies = [decode(f) for d, _, f in frames if d == "reply"]
    assert not any(isinstance(m, GBMHistogramRes) for m in replies)  # none in the clear
    assert sum(isinstance(m, GBMCatchUpRes) for m in replies) == 1

    def unmasked(recorded):  # sessions that reached unmasking: sums the coordinator learnt
        requests = [decode(f) for d, _, f in recorded if d == "request"]
        return {m.session for m in requests if isinstance(m, SecAggIns) and m.stage == "unmask"}

    # the aborted attempt revealed nothing: as many sums as levels, as without the restart
    assert len(unmasked(frames)) == len(unmasked(plain))


def test_consent_revoked_while_down_applies_at_once_and_training_goes_on():
    parties = make_parties()
    everyone = set(pl.concat([p[s] for p in parties.values() for s in p])["profile_id"])
    allowed = set(everyone)
    revoked = {f"uk-{i}" for i in range(20)}

    def revoke_after(tree):
        def on_round(record):
            if record.tree == tree:
                allowed.difference_update(revoked)

        return on_round

    job = make_job(rounds=4)
    gate = lambda job: allowed  # noqa: E731
    # at a tree boundary: the same model as a run that stayed up (it re-reads rows per tree)
    stayed_up = run_horizontal_gbm(
        job, Restarting(parties, consent_gate=gate).transport(), on_round=revoke_after(1)
    )
    allowed |= everyone
    restarted = run_horizontal_gbm(
        job,
        Restarting(parties, at=(2, 0), consent_gate=gate).transport(),
        on_round=revoke_after(1),
    )
    assert_identical(restarted, stayed_up)
    # mid-tree: the rest of tree 2 already goes without the revoked rows; the job finishes
    allowed |= everyone
    restarting = Restarting(parties, at=(2, 1), consent_gate=gate)
    mid_tree = run_horizontal_gbm(job, restarting.transport(), on_round=revoke_after(1))
    assert restarting.restarts == 1 and mid_tree.rounds == 4
    assert_same_trees(heap_trees(mid_tree.ensemble)[:2], heap_trees(stayed_up.ensemble)[:2])
    assert restarting.handlers["uk"].__self__.revoked == {"train": len(revoked)}


# --- the participant's side ----------------------------------------------------------------------


def _catch_up(**changes) -> GBMCatchUpIns:
    fields = {
        "job": make_job().to_dict(),
        "tree": 1,
        "depth": 0,
        "seed": 5,
        "base_score": 0.0,
        "edges": np.arange(4, dtype=np.float64),
        "edge_counts": np.ones(4, dtype=np.int64),
        "split_counts": np.array([1, 0]),
        "split_nodes": np.array([0]),
        "split_features": np.array([2]),
        "split_bins": np.array([0]),
        "leaf_counts": np.array([2]),
        "leaf_nodes": np.array([1, 2]),
        "leaf_values": np.array([-0.1, 0.1]),
    }
    return GBMCatchUpIns(**{**fields, **changes})


def test_a_participant_without_state_asks_for_the_setup_by_a_typed_error():
    agent = ParticipantAgent("uk", lambda job, split: make_parties()["uk"][split])
    request = GBMHistogramIns(
        job=make_job().to_dict(),
        tree=1,
        depth=1,
        seed=5,
        base_score=0.0,
        build_nodes=np.array([1]),
        features=np.arange(4),
    )
    with pytest.raises(SetupRequiredError, match=r"'uk'.*'gbm-test'.*restarted") as info:
        agent.handle(request)
    assert info.value.field == "job" and "gbm_catch_up_ins" in info.value.fix
    reply = agent.handle(_catch_up(tree=1, depth=1, split_counts=np.array([1, 0])))
    assert (reply.tree, reply.depth) == (1, 1)
    answer = agent.handle(request)  # now the level is answered
    assert isinstance(answer, GBMHistogramRes) and answer.grad.shape == (1, 4, 8)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"split_counts": np.array([1])}, "split_counts"),  # one count per tree
        ({"split_counts": np.array([2, 0])}, "split_counts"),  # counts do not sum up
        ({"leaf_counts": np.array([3])}, "leaf_counts"),
        ({"split_nodes": np.array([99])}, "split_nodes"),  # outside the node table
        ({"split_features": np.array([7])}, "split_features"),
        ({"split_bins": np.array([7])}, "split_bins"),
        ({"leaf_values": np.array([0.1])}, "leaf_values"),
        ({"tree": 9}, "tree"),
        ({"edge_counts": np.ones(3, dtype=np.int64), "edges": np.arange(3.0)}, "edge_counts"),
    ],
)
def test_malformed_catch_ups_are_refused_naming_the_field(changes, field):
    agent = ParticipantAgent("uk", lambda job, split: make_parties()["uk"][split])
    with pytest.raises(TrainingError) as info:
        agent.handle(_catch_up(**changes))
    assert info.value.field == field


def test_catch_up_messages_round_trip_and_refuse_wrong_dtypes():
    message = _catch_up()
    again = decode(encode(message))
    assert isinstance(again, GBMCatchUpIns) and (again.tree, again.depth) == (1, 0)
    for name in ("split_counts", "split_nodes", "leaf_nodes", "leaf_values", "edges"):
        np.testing.assert_array_equal(getattr(again, name), getattr(message, name))
    ack = decode(encode(GBMCatchUpRes(2, 1)))
    assert isinstance(ack, GBMCatchUpRes) and (ack.tree, ack.depth) == (2, 1)
    with pytest.raises(CodecError):
        encode(_catch_up(split_nodes=np.array([0.5])))
    with pytest.raises(CodecError):
        encode(_catch_up(leaf_values=np.array([np.nan, 0.1])))


def test_a_participant_that_cannot_catch_up_stops_the_job_naming_it():
    restarting = Restarting(make_parties(), at=(1, 0))
    restarting.broken_catch_up = True
    with pytest.raises(TrainingError, match="'uk' failed at gbm_catch_up: RuntimeError"):
        run_horizontal_gbm(make_job(), restarting.transport())
