"""ParticipantAgent on its own: data checks, imputation, caching and governance per job."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from cdp_federated import hookimpl
from cdp_federated.errors import PolicyViolation, SchemaMismatchError, TrainingError
from cdp_federated.federation import EvaluateIns, FitIns, FitRes, StatsIns, StatsRes
from cdp_federated.governance import PolicyVote
from cdp_federated.jobs import JobSpec
from cdp_federated.participant import ParticipantAgent

JOB = JobSpec(
    job_id="j",
    kind="horizontal",
    model="logreg",
    purpose="model_training",
    features=("a", "b"),
    label="y",
)


def frame(a, b, y, prefix="p") -> pl.DataFrame:
    ids = [f"{prefix}{i}" for i in range(len(a))]
    return pl.DataFrame(
        {"profile_id": ids, "a": a, "b": b, "y": y, "jurisdiction": ["EU"] * len(a)},
        schema_overrides={"a": pl.Float64, "b": pl.Float64, "y": pl.Float64},
    )


TRAIN = frame([1.0, 2.0, 3.0, 6.0], [0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0])
TEST = frame([2.0, 4.0], [1.0, 0.0], [1.0, 0.0], prefix="t")


class CountingProvider:
    def __init__(self, train=TRAIN, test=TEST) -> None:
        self.frames = {"train": train, "test": test}
        self.calls: list[tuple[str, str]] = []

    def __call__(self, job, split):
        self.calls.append((job.job_id, split))
        return self.frames[split]


def stats(agent: ParticipantAgent, job: JobSpec = JOB) -> StatsRes:
    return agent.handle(StatsIns(job=job.to_dict()))


def test_stats_are_moments_of_the_training_rows():
    reply = stats(ParticipantAgent("eu", CountingProvider()))
    x = TRAIN.select("a", "b").to_numpy()
    assert reply.count == 4 and reply.label_positives == 2.0
    np.testing.assert_allclose(reply.sums, x.sum(axis=0))
    np.testing.assert_allclose(reply.scatter, (x - x.mean(0)).T @ (x - x.mean(0)))


def test_rows_are_read_once_per_job_and_split_and_again_for_a_changed_job():
    provider = CountingProvider()
    agent = ParticipantAgent("eu", provider)
    fit = FitIns(
        job=JOB.to_dict(),
        round=1,
        parameters=np.zeros(3),
        mean=np.zeros(2),
        scale=np.ones(2),
        config={"C": 1.0, "total_examples": 4},
    )
    stats(agent)
    assert isinstance(agent.handle(fit), FitRes)
    agent.handle(fit)
    assert provider.calls == [("j", "train")]
    changed = replace(JOB, features=("a",))  # same id, different features: a new job
    assert stats(agent, changed).sums.shape == (1,)
    assert provider.calls == [("j", "train"), ("j", "train")]


def test_policy_is_checked_per_job_before_any_row_is_read(pm):
    class DenyB:
        @hookimpl
        def cdp_policy_decision(self, job, participant):
            if "b" in job.features:
                return PolicyVote(False, "feature b is restricted", "features")
            return None

    pm.register(DenyB())
    provider = CountingProvider()
    agent = ParticipantAgent("eu", provider, pm=pm)
    assert stats(agent, replace(JOB, features=("a",))).count == 4
    with pytest.raises(PolicyViolation, match="feature b is restricted"):
        stats(agent)
    assert provider.calls == [("j", "train")]


def test_missing_columns_are_named_with_what_the_participant_has():
    agent = ParticipantAgent("eu", CountingProvider(train=TRAIN.rename({"b": "b2"})))
    with pytest.raises(SchemaMismatchError, match=r"'eu' lacks columns \['b'\].*'b2'") as info:
        stats(agent)
    assert info.value.value == ["b"]


def test_non_numeric_feature_is_a_schema_mismatch():
    text = TRAIN.with_columns(pl.col("a").cast(pl.String))
    with pytest.raises(SchemaMismatchError, match="'a' is String"):
        stats(ParticipantAgent("eu", CountingProvider(train=text)))


def test_labels_must_be_zero_or_one():
    bad = TRAIN.with_columns(y=pl.Series([0.0, 2.0, None, 1.0]))
    with pytest.raises(TrainingError, match="'y' must be 0 or 1 \\(2 rows"):
        stats(ParticipantAgent("eu", CountingProvider(train=bad)))


def test_infinity_is_refused_even_with_imputation():
    bad = TRAIN.with_columns(a=pl.Series([1.0, float("inf"), 3.0, None]))
    job = replace(JOB, params={"impute": "mean"})
    with pytest.raises(TrainingError, match=r"\{'a': 1\}"):
        stats(ParticipantAgent("eu", CountingProvider(train=bad)), job)


def test_mean_imputation_uses_the_local_training_mean_on_both_splits():
    train = TRAIN.with_columns(a=pl.Series([1.0, None, 3.0, 8.0]))  # train mean of a: 4
    test = TEST.with_columns(a=pl.Series([None, 100.0]))
    agent = ParticipantAgent("eu", CountingProvider(train=train, test=test))
    job = replace(JOB, params={"impute": "mean"})
    assert stats(agent, job).sums[0] == pytest.approx(1 + 4 + 3 + 8)
    # Score the test rows with w = [1, 0], b = 0 on raw values: the imputed row scores sigmoid(4).
    reply = agent.handle(
        EvaluateIns(
            job=job.to_dict(),
            split="test",
            parameters=np.array([1.0, 0.0, 0.0]),
            mean=np.zeros(2),
            scale=np.ones(2),
            bins=2,
        )
    )
    assert reply.count == 2 and reply.positives.tolist() == [0, 1]  # imputed row: label 1
    with pytest.raises(TrainingError, match="unknown imputation"):
        stats(ParticipantAgent("eu", CountingProvider()), replace(JOB, params={"impute": "zero"}))


def test_empty_test_split_evaluates_to_nothing():
    agent = ParticipantAgent("eu", CountingProvider(test=TEST.clear()))
    reply = agent.handle(
        EvaluateIns(
            job=JOB.to_dict(),
            split="test",
            parameters=np.zeros(3),
            mean=np.zeros(2),
            scale=np.ones(2),
            bins=4,
        )
    )
    assert reply.count == 0 and reply.positives.sum() == 0 and reply.log_loss_sum == 0.0


def test_bad_fit_config_and_shapes_are_refused():
    agent = ParticipantAgent("eu", CountingProvider())
    base = FitIns(
        job=JOB.to_dict(),
        round=1,
        parameters=np.zeros(3),
        mean=np.zeros(2),
        scale=np.ones(2),
        config={"C": 1.0, "total_examples": 4},
    )
    with pytest.raises(TrainingError, match="'C' must be a positive number"):
        agent.handle(replace(base, config={"total_examples": 4}))
    with pytest.raises(SchemaMismatchError, match="parameters has shape"):
        agent.handle(replace(base, parameters=np.zeros(5)))
    with pytest.raises(TrainingError, match="does not serve"):
        agent.handle(StatsRes(1, np.zeros(2), np.zeros((2, 2)), 0.0))
