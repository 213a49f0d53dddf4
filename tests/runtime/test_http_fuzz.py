"""Fuzz the live HTTP service from its own OpenAPI document with schemathesis: schema-valid
(positive) and schema-violating (negative) requests to every operation, with valid tokens of the
role each operation wants, path parameters either generated or pinned to a real participant, job
and task. No answer may be a 5xx, and every answer must conform to the published schema (status
code, content type, headers, body; every 4xx is the documented error body).

The default suite runs a few examples per operation, derandomised; the slow suite many more.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.runtime.conftest import start_service
from tests.test_horizontal_run import make_job

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
JOB = "fuzz-job"

# result frames are opaque bytes to the fuzzer (the codec is fuzzed in tests/federation)
schemathesis.serializer.alias("application/x-cdpf", "application/octet-stream")


@pytest.fixture
def target(tmp_path):
    """A live service (long-polls capped at 0.2 s) with participants a and b, admin ops and
    observer eye; job ``fuzz-job`` waits for a's and b's statistics (a's task is delivered)."""
    live = start_service(
        f"sqlite:///{tmp_path / 'coordinator.sqlite'}",
        tmp_path / "keys",
        max_poll_wait_seconds=0.2,
        max_frame_bytes=64 * 1024,
    )
    try:
        a, _b = live.client("a"), live.client("b")
        admin, observer = live.client("ops", role="admin"), live.client("eye", role="observer")
        job = make_job(rounds=1).to_dict() | {"job_id": JOB}
        admin.submit_job(job, ["a", "b"], {"round_deadline_seconds": 600})
        task = a.poll("a", wait=5)
        assert task is not None
        with httpx.Client(base_url=live.base_url) as http:
            document = http.get("/openapi.json").json()
        tokens = {
            "participant": a.token.access_token,
            "admin": admin.token.access_token,
            "observer": observer.token.access_token,
        }
        pinned = {"participant_id": "a", "job_id": JOB, "task_id": task.task_id}
        yield live, schemathesis.openapi.from_dict(document), tokens, pinned
    finally:
        live.close()


def _role(method: str, path: str) -> str | None:
    """The role whose token each operation gets (None: a public endpoint)."""
    if path in ("/healthz", "/.well-known/jwks.json", "/v1/enrol"):
        return None
    if method == "POST" and path == "/v1/jobs":
        return "admin"
    if method == "GET" and path == "/v1/jobs/{job_id}":
        return "observer"
    return "participant"


def fuzz(target, mode: GenerationMode, examples: int) -> Counter:
    """Run ``examples`` examples per operation, path parameters generated and pinned; returns
    the status codes seen, by operation."""
    live, schema, tokens, pinned = target
    seen: Counter = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        role = _role(operation.method.upper(), operation.path)
        headers = {"Authorization": f"Bearer {tokens[role]}"} if role else {}
        names = {p.name for p in operation.path_parameters}
        variants = [None, {k: v for k, v in pinned.items() if k in names}] if names else [None]
        for fixed in variants:
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=fixed)
            try:
                _examples(strategy, live.base_url, headers, examples, seen)
            except Unsatisfiable:  # nothing in this operation can be made invalid
                assert mode == GenerationMode.NEGATIVE
    return seen


def _examples(strategy, base_url: str, headers: dict, examples: int, seen: Counter) -> None:
    @given(case=strategy)
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=10)
        case.validate_response(response, checks=CHECKS, headers=headers)
        seen[(case.operation.label, response.status_code)] += 1

    run()


def _summary(seen: Counter) -> tuple[int, Counter]:
    statuses = Counter()
    for (_label, status), count in seen.items():
        statuses[status] += count
    return sum(statuses.values()), statuses


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzing_the_openapi_schema_finds_no_5xx_and_no_nonconformance(target, mode):
    seen = fuzz(target, mode, examples=5)
    total, statuses = _summary(seen)
    print(f"\nfuzz {mode.value}: {total} requests, statuses {dict(sorted(statuses.items()))}")
    assert total >= 25
    assert not [s for s in statuses if s >= 500]
    if mode == GenerationMode.POSITIVE:
        # with real tokens and pinned ids the fuzz reaches past authentication and authorisation
        assert statuses[200] and statuses[400]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzing_many_examples(target, mode):
    seen = fuzz(target, mode, examples=150)
    total, statuses = _summary(seen)
    print(
        f"\nfuzz {mode.value} (slow): {total} requests, statuses {dict(sorted(statuses.items()))}"
    )
    assert total >= 500
    assert not [s for s in statuses if s >= 500]
