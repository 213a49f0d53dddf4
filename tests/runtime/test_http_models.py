"""Every model kind the service accepts trains over HTTP to the in-process model, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from cdp_federated.coordinator.gbm_runner import run_horizontal_gbm
from cdp_federated.coordinator.jobs import job_from_dict
from cdp_federated.coordinator.runner import run_horizontal
from cdp_federated.errors import ConfigError
from cdp_federated.participant import ParticipantAgent
from tests.test_horizontal_gbm import make_job as gbm_job
from tests.test_horizontal_gbm import make_parties as gbm_parties
from tests.test_horizontal_gbm import make_transport as gbm_transport
from tests.test_horizontal_linear import job as linear_job
from tests.test_horizontal_run import make_parties, make_transport


def _serve(live, parties, job: dict) -> tuple[dict, dict]:
    for name, frames in parties.items():
        live.participant(name, ParticipantAgent(name, (lambda f: lambda j, s: f[s])(frames)).handle)
    admin = live.client("ops", role="admin")
    job_id = admin.submit_job(job, sorted(parties), {})
    status = admin.job_status(job_id, wait=60)
    assert status["status"] == "succeeded", status
    return status, admin.job_model(job_id)


def test_gbm_job_over_http_equals_in_process(live):
    parties = gbm_parties()
    job = gbm_job(rounds=3)
    in_process = run_horizontal_gbm(job, gbm_transport(parties))

    status, model = _serve(live, parties, job.to_dict())

    assert model["estimator"] == in_process.estimator.to_dict()
    assert status["metrics"]["auc"] == in_process.auc
    assert [r["round"] for r in status["history"]] == [1, 2, 3]
    assert all(set(r) == {"round", "leaves", "splits"} for r in status["history"])


def test_linear_regression_job_over_http_equals_in_process(live):
    parties = make_parties()
    job = linear_job("linear", rounds=4)
    in_process = run_horizontal(job, make_transport(parties))

    status, model = _serve(live, parties, job.to_dict())

    assert np.array_equal(np.array(model["parameters"]), in_process.parameters)
    assert status["metrics"]["rmse"] == in_process.rmse
    assert status["metrics"]["objective"] == "regression"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model": "forest"}, "job.kind"),
        ({"kind": "vertical"}, "job.kind"),
        ({"model": "gbm", "params": {"max_depth": 0}}, "params.max_depth"),
    ],
)
def test_service_refuses_unknown_models_and_bad_gbm_params(change, field):
    raw = gbm_job().to_dict() | change
    with pytest.raises(ConfigError) as info:
        job_from_dict(raw)
    assert info.value.field == field
