"""What a participant's reply to a task must look like, checked when it is posted.

The codec already refuses malformed frames, unknown types, wrong dtypes and NaN/Inf values. What
it cannot know is the request a reply answers: a ``fit_res`` must carry as many parameters as the
``fit_ins`` sent, moments must cover the job's features, histograms the requested bins. A reply
that does not fit its task is refused when it is posted (400 naming the field), so the
participant learns at once and no round ever sees it. A ``failure`` fits every task; a reply of
another type, or to a request type this module does not know, is stored as it is and the strategy
counts it as that participant's failure ("replied X instead of Y").
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

from ..errors import CodecError
from ..federation.codec import MAGIC
from ..federation.messages import Failure, Message

__all__ = ["check_reply"]

# The codec's frame prefix: magic, format version, header length (see federation.codec).
_PREFIX = struct.Struct("<4sHI")


def _request_header(frame: bytes) -> dict[str, Any] | None:
    """The JSON header of a request frame the coordinator encoded itself (arrays not read)."""
    if len(frame) < _PREFIX.size:
        return None
    magic, _version, length = _PREFIX.unpack_from(frame)
    if magic != MAGIC:
        return None
    try:
        header = json.loads(frame[_PREFIX.size : _PREFIX.size + length])
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def _array_shape(header: dict[str, Any], name: str) -> tuple[int, ...] | None:
    for spec in header.get("arrays", []):
        if spec.get("name") == name:
            return tuple(spec["shape"])
    return None


def _stats(header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d = len(header["fields"]["job"].get("features", []))
    return {"sums": (d,), "scatter": (d, d)}


def _fit(header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    shape = _array_shape(header, "parameters")
    return {} if shape is None else {"parameters": shape}


def _evaluate(header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    bins = int(header["fields"]["bins"])
    return {"positives": (bins,), "negatives": (bins,)}


# request type -> (reply type, the reply's array shapes implied by the request)
_CONTRACTS: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, tuple[int, ...]]]]] = {
    "stats_ins": ("stats_res", _stats),
    "fit_ins": ("fit_res", _fit),
    "evaluate_ins": ("evaluate_res", _evaluate),
}


def check_reply(reply: Message, request_frame: bytes | None) -> None:
    """Return when ``reply`` (a decoded, codec-valid message) answers the task whose request was
    ``request_frame``; raise :class:`CodecError` naming the field otherwise."""
    if isinstance(reply, Failure) or request_frame is None:
        return
    header = _request_header(request_frame)
    contract = _CONTRACTS.get(header.get("type")) if header else None
    if header is None or contract is None:
        return
    wanted, shapes_of = contract
    if reply.TYPE != wanted:  # the strategy counts it as that participant's failure
        return
    for name, shape in shapes_of(header).items():
        got = tuple(getattr(reply, name).shape)
        if got != shape:
            raise CodecError(
                f"{reply.TYPE}.{name} has shape {list(got)}, the task needs {list(shape)}",
                field=f"{reply.TYPE}.{name}",
                value=list(got),
                fix=f"send {name} with shape {list(shape)}, as the task's request implies",
            )
