"""Authorisation grid: every action x role x (own / other participant) x (own / other job), from a
table written independently of the implementation; plus the scopes an endpoint must pass."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from cdp_federated.coordinator import authz
from cdp_federated.coordinator.authz import authorize
from cdp_federated.errors import ConfigError, ForbiddenError


@dataclass(frozen=True)
class Caller:
    sub: str
    role: str


# Who may do what. "all": any job and participant; "none": never; "in_job": jobs the caller is in;
# "own_in_job": its own participant id, in a job it is in.
POLICY = {
    "submit_job": {"admin": "all", "participant": "none", "observer": "none"},
    "manage_participants": {"admin": "all", "participant": "none", "observer": "none"},
    "read_job_status": {"admin": "all", "participant": "in_job", "observer": "all"},
    "read_model": {"admin": "all", "participant": "in_job", "observer": "none"},
    "poll_tasks": {"admin": "none", "participant": "own_in_job", "observer": "none"},
    "submit_result": {"admin": "none", "participant": "own_in_job", "observer": "none"},
    "read_result": {"admin": "all", "participant": "own_in_job", "observer": "none"},
    "read_relay_keys": {"admin": "none", "participant": "in_job", "observer": "none"},
    "relay_send": {"admin": "none", "participant": "own_in_job", "observer": "none"},
    "relay_receive": {"admin": "none", "participant": "own_in_job", "observer": "none"},
    "publish_relay_key": {"admin": "none", "participant": "own_in_job", "observer": "none"},
}

ME = "acme"
OWN_JOB = ("job-1", frozenset({ME, "beta"}))
OTHER_JOB = ("job-2", frozenset({"beta", "gamma"}))

GRID = [
    (action, role, whose, which)
    for action, role, whose, which in itertools.product(
        sorted(POLICY), ("admin", "participant", "observer"), ("own", "other"), ("own", "other")
    )
]


def expected(action: str, role: str, whose: str, which: str) -> str | None:
    """None when allowed, else the ForbiddenError code."""
    rule = POLICY[action][role]
    if rule == "all":
        return None
    if rule == "none":
        return "role"
    if rule == "own_in_job" and whose == "other":
        return "other_participant"
    return None if which == "own" else "not_in_job"


def test_policy_table_covers_every_action():
    assert set(POLICY) == set(authz.ACTIONS)


@pytest.mark.parametrize(("action", "role", "whose", "which"), GRID, ids="-".join)
def test_authorisation_grid(action, role, whose, which):
    caller = Caller(ME, role)
    job_id, members = OWN_JOB if which == "own" else OTHER_JOB
    participant_id = ME if whose == "own" else "beta"
    want = expected(action, role, whose, which)
    if want is None:
        authorize(
            caller, action, job_participants=members, participant_id=participant_id, job_id=job_id
        )
    else:
        with pytest.raises(ForbiddenError) as info:
            authorize(
                caller,
                action,
                job_participants=members,
                participant_id=participant_id,
                job_id=job_id,
            )
        assert info.value.code == want
        assert info.value.http_status == 403
        assert isinstance(info.value, PermissionError)


def test_grid_has_both_outcomes_for_each_participant_scoped_action():
    for action in ("poll_tasks", "submit_result", "read_result"):
        outcomes = {expected(action, "participant", w, j) for _, _, w, j in GRID}
        assert outcomes == {None, "other_participant", "not_in_job"}


@pytest.mark.parametrize("action", ["poll_tasks", "submit_result", "read_result"])
def test_participant_scoped_actions_need_a_participant(action):
    with pytest.raises(ForbiddenError) as info:
        authorize(Caller(ME, "participant"), action, job_participants={ME}, job_id="job-1")
    assert info.value.code == "missing_scope"


@pytest.mark.parametrize("action", ["read_job_status", "read_model", "poll_tasks", "read_result"])
@pytest.mark.parametrize("role", ["admin", "participant", "observer"])
def test_job_scoped_actions_need_a_job(action, role):
    with pytest.raises(ForbiddenError) as info:
        authorize(Caller(ME, role), action, job_participants={ME}, participant_id=ME)
    assert info.value.code in ("missing_scope", "role")


@pytest.mark.parametrize("action", ["poll_tasks", "submit_result"])
def test_round_cohort_limits_polling_and_submitting(action):
    caller = Caller(ME, "participant")
    scope = {"job_participants": {ME, "beta"}, "participant_id": ME, "job_id": "job-1"}
    authorize(caller, action, **scope, round_participants={ME})
    with pytest.raises(ForbiddenError) as info:
        authorize(caller, action, **scope, round_participants={"beta"})
    assert info.value.code == "not_in_round"
    # reading one's own result of a past round is not limited to the current cohort
    authorize(caller, "read_result", **scope, round_participants={"beta"})


def test_unknown_job_means_no_participants():
    with pytest.raises(ForbiddenError) as info:
        authorize(Caller(ME, "participant"), "read_job_status", job_id="nope")
    assert info.value.code == "not_in_job"


def test_participant_ids_are_compared_exactly_not_as_substrings():
    caller = Caller("acme", "participant")
    with pytest.raises(ForbiddenError):
        authorize(
            caller, "read_result", job_participants={"acme"}, participant_id="acme2", job_id="j"
        )
    with pytest.raises(ForbiddenError):
        authorize(
            Caller("acm", "participant"), "read_job_status", job_participants={"acme"}, job_id="j"
        )
    with pytest.raises(ConfigError):
        authorize(caller, "read_job_status", job_participants="acme,beta", job_id="j")


@pytest.mark.parametrize("role", ["root", "", "Admin", None])
def test_unknown_role_is_forbidden(role):
    with pytest.raises(ForbiddenError) as info:
        authorize(Caller(ME, role), "read_job_status", job_participants={ME}, job_id="j")
    assert info.value.code == "role"


def test_unknown_action_is_a_programming_error():
    with pytest.raises(ConfigError):
        authorize(Caller(ME, "admin"), "delete_everything")
