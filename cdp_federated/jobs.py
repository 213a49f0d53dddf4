"""Job specification shared by coordinator, participants, governance and hooks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["JobSpec"]


@dataclass(frozen=True)
class JobSpec:
    """What a federated job trains, on what, for which purpose.

    ``features`` and ``label`` name connector columns; ``purpose`` is the consent purpose every
    participant checks its rows against; ``params`` holds the algorithm's parameters.
    """

    job_id: str
    kind: str  # "horizontal" or "vertical" (its parties and roles: params, see vertical_job.py)
    model: str  # "logreg", "linear", "gbm"; vertical: "secureboost" or "logreg"
    purpose: str
    features: tuple[str, ...]
    label: str
    rounds: int = 20
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["features"] = list(self.features)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        data = dict(data)
        data["features"] = tuple(data["features"])
        return cls(**data)
