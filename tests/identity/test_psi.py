"""ECDH PSI: correctness of the intersection, the reveal policy, alignment and the group maths."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import polars as pl
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_federated.errors import ConfigError, ProtocolError
from cdp_federated.federation.transport import InProcessTransport
from cdp_federated.identity.psi import (
    AlignmentResult,
    PsiConfig,
    PsiParty,
    align_many,
    match_report,
    run_psi,
    tag_bytes,
)
from cdp_federated.identity.psi_crypto import (
    SmallOrderPoint,
    X25519Group,
    canonical_rows,
    hash_to_group,
    secure_permutation,
)
from cdp_federated.identity.psi_messages import PsiPoints, PsiStart

from .conftest import BannedRandomnessError

POOL = [f"user{i}@example.com" for i in range(24)]
ids_lists = st.lists(st.sampled_from(POOL), max_size=30)


def expected_rows(ids: list[str], common: set[str]) -> dict[str, int]:
    """id -> the row of its first occurrence, for the ids in ``common``."""
    first: dict[str, int] = {}
    for row, value in enumerate(ids):
        first.setdefault(value, row)
    return {value: row for value, row in first.items() if value in common}


def check_alignment(left: list[str], right: list[str], result) -> None:
    common = set(left) & set(right)
    assert result.intersection_size == len(common)
    assert result.left_rows is not None and result.right_rows is not None
    aligned_left = [left[r] for r in result.left_rows]
    aligned_right = [right[r] for r in result.right_rows]
    assert aligned_left == aligned_right  # row k of each side is the same id
    assert set(aligned_left) == common
    assert sorted(result.left_rows.tolist()) == sorted(expected_rows(left, common).values())
    assert sorted(result.right_rows.tolist()) == sorted(expected_rows(right, common).values())


# --- correctness ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(left=ids_lists, right=ids_lists, batch=st.integers(1, 7))
def test_intersection_matches_set_semantics(left, right, batch):
    result = run_psi(left, right, reveal_to=("left", "right"), workers=1, batch_size=batch)
    check_alignment(left, right, result)


@settings(max_examples=20, deadline=None)
@given(left=ids_lists, right=ids_lists)
def test_cardinality_counts_distinct_common_ids(left, right):
    result = run_psi(left, right, mode="cardinality", workers=1, batch_size=4)
    assert result.intersection_size == len(set(left) & set(right))
    assert result.left_rows is None and result.right_rows is None


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ([], []),
        ([], ["a@x.com"]),
        (["a@x.com", "a@x.com"], []),
        (POOL, POOL),  # full overlap
        (POOL[:10], POOL[10:]),  # none
        (POOL + POOL[::-1], POOL[5:] * 3),  # duplicates on both sides
    ],
)
def test_edge_cases(left, right):
    check_alignment(left, right, run_psi(left, right, reveal_to=("left", "right"), workers=1))


def test_reveal_policy_decides_who_gets_rows():
    left, right = POOL[:15], POOL[8:]
    only_left = run_psi(left, right, reveal_to=("left",), workers=1)
    assert only_left.left_rows is not None and only_left.right_rows is None
    only_right = run_psi(left, right, reveal_to=("right",), workers=1)
    assert only_right.left_rows is None and only_right.right_rows is not None
    assert sorted(right[r] for r in only_right.right_rows) == sorted(set(left) & set(right))
    assert only_left.intersection_size == only_right.intersection_size == 7
    with pytest.raises(ConfigError):
        only_left.alignment("right")
    aligned = only_left.alignment("left")
    assert isinstance(aligned, AlignmentResult) and aligned.size == 7


def test_nulls_and_empty_strings_never_match():
    left = pl.Series(["a@x.com", None, "", "b@x.com"])
    right = ["", "b@x.com", None]
    result = run_psi(left, right, reveal_to=("left", "right"), workers=1)
    assert result.intersection_size == 1
    assert result.left_rows.tolist() == [3] and result.right_rows.tolist() == [1]


def test_inputs_must_be_strings():
    with pytest.raises(ConfigError, match="normalised id strings"):
        run_psi([1, 2], ["a"], workers=1)
    with pytest.raises(ConfigError):
        run_psi(pl.Series([1, 2]), ["a"], workers=1)
    with pytest.raises(ConfigError, match="reveal_to"):
        run_psi(["a"], ["a"], reveal_to=(), workers=1)
    with pytest.raises(ConfigError, match="mode"):
        run_psi(["a"], ["a"], mode="union", workers=1)
    with pytest.raises(ConfigError, match="batch"):
        run_psi(["a"], ["a"], batch_size=0, workers=1)


def test_process_pool_path_agrees_with_sets():
    left = [f"p{i}@example.org" for i in range(3000)]
    right = [f"p{i}@example.org" for i in range(2000, 5200)]
    result = run_psi(left, right, reveal_to=("left", "right"), workers=2, batch_size=2500)
    assert result.intersection_size == 1000
    check_alignment(left, right, result)
    assert result.frames > 0 and result.bytes_exchanged >= (32 + 8) * 3000 + 32 * 3200


def test_bytes_exchanged_is_close_to_the_floor():
    # Two 32-byte points per receiver id out and one truncated tag back, one point per sender id.
    left, right = POOL * 1, POOL[4:]
    result = run_psi(left, right, workers=1)
    t = tag_bytes(len(left), len(right), 1e-9)
    floor = (32 + t) * len(left) + 32 * len(right)
    assert floor <= result.bytes_exchanged <= floor + 6000  # headers of ~12 frames


# --- cardinality reveals only the count ------------------------------------------------------------


def drive(receiver: PsiParty, sender: PsiParty, session: str) -> list:
    """Relay the two parties through a real transport; return every message the receiver got."""
    got: list = []
    transport = InProcessTransport({"r": receiver.handle, "s": sender.handle})
    message, turn = PsiStart(session=session), "r"
    while True:
        reply = transport.request(turn, message)
        if turn == "s":
            got.append(reply)
        if type(reply).__name__ == "PsiDone" and type(message).__name__ == "PsiDone":
            return got
        message, turn = reply, ("s" if turn == "r" else "r")


@pytest.mark.parametrize("mode", ["intersection", "cardinality"])
def test_cardinality_mode_reshuffles_the_receivers_tags(mode):
    ids = [f"c{i}@example.com" for i in range(60)]
    config = PsiConfig(session=f"s-{mode}", mode=mode, batch_size=25)
    receiver = PsiParty(ids, role="receiver", config=config)
    sender = PsiParty(ids[30:] + ["z@example.com"], role="sender", config=config)
    got = drive(receiver, sender, config.session)
    tags = np.concatenate(
        [m.points for m in got if isinstance(m, PsiPoints) and m.stage == "receiver_tags"]
    )
    # What the tags would be in the receiver's own (shuffled) sending order, recomputed with both
    # secrets (which only this test holds).
    order = receiver._order
    hashed = hash_to_group([ids[i] for i in order])
    single = X25519Group(workers=1).blind_points(receiver._scalar, hashed)
    double = X25519Group(workers=1).blind_points(sender._scalar, single)[:, : receiver.tag_bytes]
    same_order = bool((double == tags).all())
    outcome = receiver.outcome()
    assert outcome.size == 30
    if mode == "intersection":
        assert same_order and outcome.rows is not None
    else:
        # Same multiset, another order (60! orders): the receiver cannot tell which ids matched.
        assert not same_order and outcome.rows is None
        key = lambda a: sorted(map(bytes, a))  # noqa: E731
        assert key(double) == key(tags)
        assert sender.outcome().size is None


def test_cardinality_size_goes_to_the_sender_only_when_named():
    ids = [f"d{i}@example.com" for i in range(10)]
    both = PsiConfig(session="c2", mode="cardinality", reveal=("receiver", "sender"))
    receiver = PsiParty(ids, role="receiver", config=both)
    sender = PsiParty(ids[4:], role="sender", config=both)
    drive(receiver, sender, "c2")
    assert sender.outcome().size == 6 and sender.outcome().rows is None


# --- multi-party alignment ---------------------------------------------------------------------


def test_align_many_aligns_on_the_common_intersection():
    label = [f"m{i}@example.com" for i in range(40)] + ["m1@example.com"]
    a = [f"m{i}@example.com" for i in range(10, 60)]
    b = [f"m{i}@example.com" for i in range(0, 30, 2)] + ["zz@example.com"]
    result = align_many(label, {"a": a, "b": b}, workers=1, batch_size=16)
    common = set(label) & set(a) & set(b)
    assert set(result) == {"label", "a", "b"}
    ordered = [label[r] for r in result["label"].rows]
    assert set(ordered) == common and len(ordered) == len(common) == result["label"].size
    assert [a[r] for r in result["a"].rows] == ordered
    assert [b[r] for r in result["b"].rows] == ordered


def test_align_many_reveals_to_a_passive_party_only_the_common_rows():
    label = [f"n{i}@example.com" for i in range(20)]
    a = label[:15]  # a's pairwise intersection with the label party: 15 ids
    b = label[10:]  # common to all three: 5 ids
    result = align_many(label, {"a": a, "b": b}, workers=1)
    assert result["a"].size == 5  # never the 15 of the pairwise intersection
    assert sorted(a[r] for r in result["a"].rows) == sorted(label[10:15])


def test_align_many_validates_names():
    with pytest.raises(ConfigError):
        align_many(["a"], {}, workers=1)
    with pytest.raises(ConfigError):
        align_many(["a"], {"label": ["a"]}, workers=1)


# --- cohort suppression ------------------------------------------------------------------------


def test_match_report_suppresses_small_counts():
    assert match_report(500, 100) == 500
    assert match_report(100, 100) == 100
    assert match_report(99, 100) == "<100"
    assert match_report(0, 100) == "<100"
    with pytest.raises(ConfigError):
        match_report(5, 0)


def test_tag_bytes_tracks_the_false_positive_budget():
    assert tag_bytes(0, 0, 1e-9) == 8
    assert tag_bytes(100_000, 100_000, 1e-9) == 8  # 2**-64 * 1e10 < 1e-9
    assert tag_bytes(1_000_000, 1_000_000, 1e-9) == 9
    assert tag_bytes(10**6, 10**6, 1e-30) == 18  # log2(1e42) = 139.5 bits
    assert tag_bytes(10**9, 10**9, 1e-300) == 32


# --- group operations --------------------------------------------------------------------------


def test_blinding_commutes_and_hash_is_a_masked_sha256():
    ids = ["a@example.com", "b@example.com"]
    hashed = hash_to_group(ids)
    digest = hashlib.sha256(b"cdp-fl psi v1\x00a@example.com").digest()
    assert hashed[0, :31].tobytes() == digest[:31] and hashed[0, 31] == digest[31] & 0x7F
    group = X25519Group(workers=1)
    a, b = os.urandom(32), os.urandom(32)
    ab = group.blind_points(b, group.blind_ids(a, ids))
    ba = group.blind_points(a, group.blind_ids(b, ids))
    assert (ab == ba).all()
    assert (group.blind_ids(a, ids) == group.blind_points(a, hashed)).all()
    # Against cryptography directly.
    expected = X25519PrivateKey.from_private_bytes(a).exchange(
        X25519PublicKey.from_public_bytes(hashed[1].tobytes())
    )
    assert group.blind_ids(a, ids)[1].tobytes() == expected


def test_process_pool_matches_in_process_and_locates_small_order_points():
    points = hash_to_group([f"q{i}" for i in range(50)])
    scalar = os.urandom(32)
    serial = X25519Group(workers=1).blind_points(scalar, points)
    with X25519Group(workers=2, min_parallel=1) as group:
        assert (group.blind_points(scalar, points) == serial).all()
        bad = points.copy()
        bad[37] = 0  # u = 0: the identity's neighbour of small order
        with pytest.raises(SmallOrderPoint) as info:
            group.blind_points(scalar, bad)
        assert info.value.index == 37


def test_canonical_rows_rejects_encodings_at_or_above_p():
    p = 2**255 - 19
    values = [0, 1, p - 1, p, p + 5, 2**255 - 1, 2**256 - 1]
    rows = np.array([list(v.to_bytes(32, "little")) for v in values], dtype=np.uint8)
    assert canonical_rows(rows).tolist() == [True, True, True, False, False, False, False]


def test_secure_permutation_is_a_permutation_and_uses_the_injected_rng():
    perm = secure_permutation(1000)
    assert sorted(perm.tolist()) == list(range(1000))
    fixed = lambda n: bytes(range(n % 256)) * (n // 256) + bytes(range(n % 256))  # noqa: E731
    assert (secure_permutation(300, fixed) == secure_permutation(300, fixed)).all()
    assert secure_permutation(0).tolist() == [] and secure_permutation(1).tolist() == [0]


def test_party_refuses_to_report_before_done():
    party = PsiParty(["a"], role="receiver", config=PsiConfig(session="x"))
    with pytest.raises(ProtocolError):
        party.outcome()
    with pytest.raises(ConfigError):
        PsiParty(["a"], role="observer", config=PsiConfig(session="x"))


# --- the randomness fixture itself -------------------------------------------------------------


def _product_function(body: str, module: str = "cdp_federated.identity.fake"):
    namespace = {"__name__": module}
    exec(compile(f"def f():\n    {body}\n", "<fake product module>", "exec"), namespace)
    return namespace["f"]


@pytest.mark.parametrize(
    "body",
    [
        "import random; return random.random()",
        "import random; return random.getrandbits(8)",
        "import random; return random.randbytes(4)",
        "import numpy; return numpy.random.default_rng()",
        "import numpy; return numpy.random.random()",
        "import numpy; return numpy.random.permutation(5)",
    ],
)
def test_fixture_fails_product_code_that_uses_insecure_randomness(body, ban_insecure_randomness):
    with pytest.raises(BannedRandomnessError):
        _product_function(body)()
    assert ban_insecure_randomness  # recorded, so the test would fail at teardown too
    ban_insecure_randomness.clear()


def test_fixture_lets_tests_and_other_modules_use_seeded_generators():
    data = np.random.default_rng(7).integers(0, 10, size=5)  # test data: allowed
    assert len(data) == 5
    assert _product_function("return __import__('numpy').random.default_rng(1)", "tests.x")()
    assert _product_function("return 1 + 1")() == 2  # product code without randomness is fine
