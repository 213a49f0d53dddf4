"""Task messages of a vertical job run by the coordinator service (registered with the codec).

The coordinator sends each party one ``vertical_start_ins`` (the job; the party reads its role
from ``params``), then ``vertical_status_ins`` long-polls until the party reports the end. Every
reply is a ``vertical_status_res``: the party's state, a progress count (trees or epochs done,
from the active party) and, at the end, the summary the job row keeps. Nothing else of the
protocol passes here: alignment and training messages travel sealed through the relay.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .messages import Message, register

__all__ = ["VerticalStartIns", "VerticalStatusIns", "VerticalStatusRes", "RUNNING", "SUCCEEDED"]

RUNNING, SUCCEEDED = "running", "succeeded"


@register("vertical_start_ins", version=1)
@dataclasses.dataclass(frozen=True, eq=False)
class VerticalStartIns(Message):
    """Start this party's side of ``job`` (a ``JobSpec.to_dict()`` with ``kind: vertical``)."""

    job: dict[str, Any]


@register("vertical_status_ins", version=1)
@dataclasses.dataclass(frozen=True, eq=False)
class VerticalStatusIns(Message):
    """Report on ``job_id`` once its state or progress changes past ``progress``, or after
    ``wait`` seconds at the latest."""

    job_id: str
    progress: int
    wait: float


@register("vertical_status_res", version=1)
@dataclasses.dataclass(frozen=True, eq=False)
class VerticalStatusRes(Message):
    """``state`` is ``running`` or ``succeeded`` (a failure is a ``Failure`` reply).
    ``progress`` counts trees or epochs done (the active party; passive parties report 0).
    ``summary`` (at the end): aggregate metrics on held-out aligned rows, the intersection
    size, seconds and the id of the model part the party keeps in its own registry."""

    job_id: str
    state: str
    progress: int
    summary: dict[str, Any]
