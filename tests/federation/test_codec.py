"""The binary codec: exact round trips, and CodecError (never anything else) for malformed frames."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cdp_federated.errors import CodecError
from cdp_federated.federation import (
    Codec,
    EvaluateIns,
    EvaluateRes,
    Failure,
    FitIns,
    FitRes,
    Message,
    StatsIns,
    StatsRes,
    decode,
    encode,
    register,
)
from cdp_federated.federation.codec import ALLOWED_DTYPES, MAGIC

JOB = {"job_id": "j1", "features": ["a", "b"], "label": "y", "params": {"C": 0.5}}

# A private registry: one message with an array field of every kind, for dtype round trips.
TEST_TYPES: dict[str, type[Message]] = {}


@register("blob", version=3, arrays={"data": "fiub"}, registry=TEST_TYPES)
@dataclasses.dataclass(frozen=True, eq=False)
class Blob(Message):
    data: np.ndarray
    note: str = ""


BLOB_CODEC = Codec(types=TEST_TYPES)


def every_message() -> list[Message]:
    d = 3
    return [
        StatsIns(job=JOB, split="train"),
        StatsRes(count=10, sums=np.arange(d, dtype=float), scatter=np.eye(d), label_positives=4.0),
        FitIns(
            job=JOB,
            round=2,
            parameters=np.linspace(-1, 1, d + 1),
            mean=np.zeros(d),
            scale=np.ones(d),
            config={"C": 1.0, "local_steps": 1, "nested": {"a": [1, 2.5, "x", None, True]}},
            preconditioner=np.eye(d + 1),
        ),
        FitIns(
            job=JOB,
            round=1,
            parameters=np.zeros(0),
            mean=np.zeros(0),
            scale=np.zeros(0),
            config={},
        ),
        FitRes(parameters=np.array([0.25, -3.5]), num_examples=7, metrics={"loss": 0.69}),
        FitRes(parameters=np.array(1.5), num_examples=1),  # 0-d array
        EvaluateIns(
            job=JOB, split="test", parameters=np.ones(2), mean=np.zeros(1), scale=np.ones(1), bins=4
        ),
        EvaluateRes(
            positives=np.array([0, 1, 2, 3]),
            negatives=np.array([3, 2, 1, 0], dtype=np.uint32),
            log_loss_sum=1.25,
            count=12,
        ),
        EvaluateRes(
            positives=np.zeros(0, np.int64),
            negatives=np.zeros(0, np.int64),
            log_loss_sum=0.0,
            count=0,
        ),
        Failure(participant="eu", stage="fit", error_type="TrainingError", message='ü ✓ "quoted"'),
    ]


def assert_same(a: Message, b: Message) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray)
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y and type(x) is type(y), f.name


@pytest.mark.parametrize("message", every_message(), ids=lambda m: m.TYPE)
def test_every_message_type_round_trips(message):
    decoded = decode(encode(message))
    assert_same(message, decoded)


def test_decoded_arrays_are_read_only_native_copies():
    frame = encode(FitRes(parameters=np.arange(3.0), num_examples=3))
    decoded = decode(frame)
    assert not decoded.parameters.flags.writeable
    assert decoded.parameters.flags.c_contiguous and decoded.parameters.dtype.isnative
    with pytest.raises(ValueError):
        decoded.parameters[0] = 9.0


def test_big_endian_arrays_are_sent_little_endian():
    big = np.array([1.0, 2.0], dtype=">f8")
    frame = encode(FitRes(parameters=big, num_examples=2))
    assert np.array([1.0, 2.0], dtype="<f8").tobytes() in frame
    np.testing.assert_array_equal(decode(frame).parameters, [1.0, 2.0])


def test_frame_layout_is_magic_version_header_then_buffers():
    frame = encode(FitRes(parameters=np.array([1.0, 2.0]), num_examples=2))
    magic, version, head_len = struct.unpack_from("<4sHI", frame)
    header = json.loads(frame[10 : 10 + head_len])
    assert magic == MAGIC and version == 1
    assert header["type"] == "fit_res" and header["version"] == 1
    assert header["arrays"] == [
        {"name": "parameters", "dtype": "float64", "shape": [2], "offset": 0, "length": 16}
    ]
    assert frame[10 + head_len :] == np.array([1.0, 2.0], "<f8").tobytes()


# --- malformed input -> CodecError ---------------------------------------------------------------


def frame_with(header_changes=None, *, payload=None, base=None):
    """Re-frame a valid FitRes with its header edited (or its payload replaced)."""
    frame = base or encode(FitRes(parameters=np.array([1.0, 2.0]), num_examples=2))
    _, _, head_len = struct.unpack_from("<4sHI", frame)
    header = json.loads(frame[10 : 10 + head_len])
    body = frame[10 + head_len :] if payload is None else payload
    if header_changes:
        header_changes(header)
    head = json.dumps(header).encode()
    return struct.pack("<4sHI", MAGIC, 1, len(head)) + head + body


def raw_frame(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("<4sHI", MAGIC, 1, len(header)) + header + payload


def set_array(key, value):
    return lambda h: h["arrays"][0].__setitem__(key, value)


GOOD = encode(FitRes(parameters=np.array([1.0, 2.0]), num_examples=2))

MALFORMED = {
    "not bytes": "a string",
    "empty": b"",
    "bad magic": b"XXXX" + GOOD[4:],
    "bad version": GOOD[:4] + struct.pack("<H", 2) + GOOD[6:],
    "truncated prefix": GOOD[:7],
    "truncated header": GOOD[:20],
    "truncated payload": GOOD[:-1],
    "trailing bytes": GOOD + b"\x00",
    "header not json": raw_frame(b"{x}"),
    "header not utf8": raw_frame(b"\xff\xfe"),
    "header is a list": raw_frame(b"[]"),
    "header NaN constant": raw_frame(
        b'{"type":"fit_res","version":1,"fields":{"num_examples":2,"metrics":{"loss":NaN}},'
        b'"arrays":[{"name":"parameters","dtype":"float64","shape":[0],"offset":0,"length":0}]}'
    ),
    "unknown message type": frame_with(lambda h: h.__setitem__("type", "exec_code")),
    "unknown message version": frame_with(lambda h: h.__setitem__("version", 99)),
    "extra header key": frame_with(lambda h: h.__setitem__("pickle", True)),
    "missing scalar field": frame_with(lambda h: h["fields"].pop("num_examples")),
    "extra scalar field": frame_with(lambda h: h["fields"].__setitem__("evil", 1)),
    "wrong scalar type": frame_with(lambda h: h["fields"].__setitem__("num_examples", "2")),
    "bool as int": frame_with(lambda h: h["fields"].__setitem__("num_examples", True)),
    "dict scalar is a list": frame_with(lambda h: h["fields"].__setitem__("metrics", [])),
    "missing array": frame_with(lambda h: h["arrays"].clear(), payload=b""),
    "duplicate array": frame_with(lambda h: h["arrays"].append(dict(h["arrays"][0]))),
    "unknown array name": frame_with(set_array("name", "weights")),
    "object dtype": frame_with(set_array("dtype", "object")),
    "unicode dtype": frame_with(set_array("dtype", "<U8")),
    "float16 dtype": frame_with(set_array("dtype", "float16")),
    "integer parameters": frame_with(set_array("dtype", "int64")),
    "lying length": frame_with(set_array("length", 8)),
    "lying length matching payload": frame_with(set_array("length", 24), payload=bytes(24)),
    "lying shape": frame_with(set_array("shape", [3])),
    "negative shape": frame_with(set_array("shape", [-2])),
    "float shape": frame_with(set_array("shape", [2.0])),
    "lying offset": frame_with(set_array("offset", 8)),
    "string length": frame_with(set_array("length", "16")),
    "huge shape": frame_with(set_array("shape", [2**62, 2**62])),
    "too many dims": frame_with(set_array("shape", [1] * 40)),
    "NaN in FitRes": frame_with(payload=np.array([1.0, np.nan]).tobytes()),
    "Inf in FitRes": frame_with(payload=np.array([np.inf, 1.0]).tobytes()),
    "deep nesting": raw_frame(b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.parametrize("frame", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_frames_raise_codec_error(frame):
    with pytest.raises(CodecError):
        decode(frame)


def test_nan_in_fitres_names_the_field():
    with pytest.raises(CodecError) as info:
        decode(MALFORMED["NaN in FitRes"])
    assert info.value.field == "fit_res.parameters"
    assert "NaN" in str(info.value)


def test_nan_in_fitins_is_refused_at_decode_and_encode():
    ins = FitIns(
        job=JOB, round=1, parameters=np.zeros(2), mean=np.zeros(1), scale=np.ones(1), config={}
    )
    frame = encode(ins)
    _, _, head_len = struct.unpack_from("<4sHI", frame)
    start = 10 + head_len  # parameters is the first buffer
    poisoned = frame[:start] + np.array([0.0, np.inf]).tobytes() + frame[start + 16 :]
    with pytest.raises(CodecError, match="fit_ins.parameters"):
        decode(poisoned)
    with pytest.raises(CodecError, match="fit_ins.parameters"):
        encode(dataclasses.replace(ins, parameters=np.array([np.nan, 0.0])))


def test_huge_finite_floats_pass_although_their_sum_overflows():
    # Finite values whose sum overflows are still finite: the check must not refuse them.
    big = np.array([1e308, 1e308, -1e308], dtype=np.float64)
    with np.errstate(over="ignore"):
        assert not np.isfinite(big.sum())
    np.testing.assert_array_equal(decode(encode(FitRes(big, num_examples=1))).parameters, big)
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode(FitRes(np.array([1e308, 1e308, np.nan]), num_examples=1))
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode(FitRes(np.array([np.inf, -np.inf], dtype=np.float32), num_examples=1))


def test_bool_bytes_other_than_zero_or_one_are_refused():
    frame = BLOB_CODEC.encode(Blob(data=np.array([True, False])))
    with pytest.raises(CodecError, match="bool"):
        BLOB_CODEC.decode(frame[:-1] + b"\x02")


def test_unknown_dtypes_and_objects_are_refused_at_encode():
    with pytest.raises(CodecError, match="not allowed"):
        BLOB_CODEC.encode(Blob(data=np.array(["a", "b"])))
    with pytest.raises(CodecError, match="not allowed"):
        BLOB_CODEC.encode(Blob(data=np.array([object()], dtype=object)))
    with pytest.raises(CodecError):
        encode(FitRes(parameters=np.zeros(2), num_examples=1, metrics={"loss": float("nan")}))
    with pytest.raises(CodecError):
        encode(FitRes(parameters=np.zeros(2), num_examples=1, metrics={"n": np.int64(3)}))
    with pytest.raises(CodecError):
        encode(FitRes(parameters=np.zeros(2), num_examples="7"))
    with pytest.raises(CodecError, match="registered"):
        BLOB_CODEC.encode(FitRes(parameters=np.zeros(2), num_examples=1))


def test_size_and_element_limits_apply_both_ways():
    small = Codec(max_bytes=400)
    big = FitRes(parameters=np.zeros(100), num_examples=1)
    frame = encode(big)
    with pytest.raises(CodecError, match="maximum size"):
        small.encode(big)
    with pytest.raises(CodecError, match="maximum size"):
        small.decode(frame)
    few = Codec(max_elements=50)
    with pytest.raises(CodecError, match="too many"):
        few.encode(big)
    with pytest.raises(CodecError, match="too many"):
        few.decode(frame)


def test_a_codec_refuses_types_it_was_not_given():
    with pytest.raises(CodecError, match="unknown message type"):
        BLOB_CODEC.decode(GOOD)


def test_decode_accepts_bytearray_and_memoryview():
    assert decode(bytearray(GOOD)).num_examples == 2
    assert decode(memoryview(GOOD)).num_examples == 2


# --- properties ----------------------------------------------------------------------------------

wire_arrays = hnp.arrays(
    dtype=st.sampled_from(ALLOWED_DTYPES).map(np.dtype),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    elements={"allow_nan": False, "allow_infinity": False},
)


@given(wire_arrays, st.text(max_size=20))
def test_any_allowed_array_round_trips_exactly(array, note):
    decoded = BLOB_CODEC.decode(BLOB_CODEC.encode(Blob(data=array, note=note)))
    assert decoded.data.dtype == array.dtype and decoded.data.shape == array.shape
    assert decoded.data.tobytes() == np.ascontiguousarray(array).tobytes()
    assert decoded.note == note


@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_codec_error(data):
    try:
        decode(data)
    except CodecError:
        pass


@given(st.integers(0, len(GOOD) - 1), st.integers(0, 255))
def test_single_byte_corruptions_only_ever_raise_codec_error(position, value):
    corrupted = GOOD[:position] + bytes([value]) + GOOD[position + 1 :]
    try:
        decode(corrupted)
    except CodecError:
        pass
