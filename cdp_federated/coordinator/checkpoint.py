"""A round checkpoint as bytes for the coordinator's database, and back, without pickle.

Layout::

    b"CDPK" | u16 format version | u32 header length | header (UTF-8 JSON) | .npy buffers

The header holds the scalars (round, row counts per participant, the moments' count, the
strategy's and the runner's scalar state, the committed rounds' records) and, per array, its name
(``strategy.<key>`` and ``runner.<key>`` for state arrays), offset and length. Each array is one ``.npy`` buffer written with ``np.save(allow_pickle=False)`` and read
with ``np.load(allow_pickle=False)``, so an object array can neither be stored nor come back.
``.npy`` keeps dtype, shape and every bit, which is what a bit-identical resume needs; unlike the
wire codec, it also keeps the bool mask of constant features and any dtype a strategy uses.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CodecError, ConfigError
from ..learning.aggregate import Moments
from .runner import Checkpoint, RoundRecord

__all__ = ["MAGIC", "FORMAT_VERSION", "encode_checkpoint", "decode_checkpoint"]

MAGIC = b"CDPK"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHI")
_MOMENTS = ("mean", "scale", "covariance", "constant")
_STATES = {"strategy": "strategy_state", "runner": "runner_state"}  # array prefix -> field


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    """The checkpoint's bytes. Strategy state must be numpy arrays (numeric or bool) and JSON
    values; anything else is a :class:`ConfigError` naming the key."""
    arrays: dict[str, np.ndarray] = {
        "parameters": checkpoint.parameters,
        "preconditioner": checkpoint.preconditioner,
        **{name: getattr(checkpoint.moments, name) for name in _MOMENTS},
    }
    scalars: dict[str, dict[str, Any]] = {}
    for prefix, name in _STATES.items():
        scalars[prefix] = {}
        for key, value in sorted(getattr(checkpoint, name).items()):
            if isinstance(value, np.ndarray):
                arrays[f"{prefix}.{key}"] = value
            else:
                scalars[prefix][key] = _json_value(name, key, value)
    entries, buffers, offset = [], [], 0
    for name, array in arrays.items():
        buffer = io.BytesIO()
        try:
            np.save(buffer, np.asarray(array), allow_pickle=False)
        except ValueError:
            raise ConfigError(
                f"checkpoint array {name!r} has dtype {np.asarray(array).dtype}, which needs pickle",
                field=_STATES.get(name.partition(".")[0], "checkpoint"),
                value=name,
                fix="keep strategy state as numeric or bool numpy arrays and JSON scalars",
            ) from None
        data = buffer.getvalue()
        entries.append({"name": name, "offset": offset, "length": len(data)})
        buffers.append(data)
        offset += len(data)
    header = {
        "round": checkpoint.round,
        "count": int(checkpoint.moments.count),
        "train_rows": {k: int(v) for k, v in sorted(checkpoint.train_rows.items())},
        **scalars,
        "history": [_record_dict(r) for r in checkpoint.history],
        "arrays": entries,
    }
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw)) + raw + b"".join(buffers)


def decode_checkpoint(data: bytes) -> Checkpoint:
    """The checkpoint :func:`encode_checkpoint` wrote; anything else is a :class:`CodecError`."""
    try:
        magic, version, size = _PREFIX.unpack_from(data)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise ValueError(f"not a version-{FORMAT_VERSION} checkpoint")
        start = _PREFIX.size + size
        header = json.loads(data[_PREFIX.size : start])
        body = memoryview(data)[start:]
        arrays: dict[str, np.ndarray] = {}
        for entry in header["arrays"]:
            offset, length = int(entry["offset"]), int(entry["length"])
            if offset < 0 or length < 0 or offset + length > len(body):
                raise ValueError(f"array {entry['name']!r} lies outside the checkpoint")
            buffer = io.BytesIO(body[offset : offset + length])
            array = np.load(buffer, allow_pickle=False)
            if not isinstance(array, np.ndarray):  # an .npz archive is not one array
                raise ValueError(f"entry {entry['name']!r} is not a .npy array")
            arrays[str(entry["name"])] = array
        states: dict[str, dict[str, Any]] = {p: dict(header[p]) for p in _STATES}
        for name, array in arrays.items():
            prefix, dot, key = name.partition(".")
            if dot and prefix in states:
                states[prefix][key] = array
        moments = Moments(int(header["count"]), *(arrays[name] for name in _MOMENTS))
        return Checkpoint(
            round=int(header["round"]),
            parameters=arrays["parameters"],
            moments=moments,
            preconditioner=arrays["preconditioner"],
            train_rows={str(k): int(v) for k, v in header["train_rows"].items()},
            strategy_state=states["strategy"],
            history=tuple(_record(r) for r in header["history"]),
            runner_state=states["runner"],
        )
    except (ValueError, KeyError, TypeError, AttributeError, struct.error, EOFError) as exc:
        raise CodecError(
            f"cannot read the job's checkpoint: {exc}",
            field="checkpoint",
            fix="the coordinator's database is damaged or from another release; "
            "submit the job again",
        ) from None


def _json_value(field: str, key: str, value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{field} {key!r} is a {type(value).__name__}, not an array or JSON value",
            field=field,
            value=key,
            fix="keep strategy state as numpy arrays and JSON scalars",
        ) from None
    return value


def _record_dict(record: RoundRecord) -> dict[str, Any]:
    """Every field of the record (tuples as lists, mappings as objects; NaN losses are kept:
    Python's JSON writes and reads them), so fields added to RoundRecord are kept too."""
    out: dict[str, Any] = {}
    for item in dataclasses.fields(record):
        value = getattr(record, item.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        out[item.name] = value
    return out


def _record(data: Mapping[str, Any]) -> RoundRecord:
    known = {item.name for item in dataclasses.fields(RoundRecord)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"round record has unknown fields {unknown}")
    return RoundRecord(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
