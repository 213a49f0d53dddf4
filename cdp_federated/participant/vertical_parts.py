"""A vertical model split by owner, each part kept in its owner's own registry (JSON, never pickle).

* SecureBoost, active party: the base margin, every tree's structure with split ids
  (``owner``, ``ref``) and every leaf weight, plus the thresholds of its *own* splits.
* SecureBoost, passive party: its lookup table ``record -> (feature, threshold)`` only.
* Logistic regression: each party's weights on its own standardised columns (mean, scale); the
  active party also the intercept.

No part is a usable model on its own: scoring needs every owner (cooperative scoring,
``docs/vertical.md``). The coordinator learns only each part's model id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import registry
from ..errors import ModelFormatError
from ..store import Store

__all__ = ["PART_FORMAT", "VerticalModelPart", "secureboost_part", "logreg_part", "save_part"]

PART_FORMAT = "cdp_federated.VerticalModelPart"
KIND = "vertical"


class VerticalModelPart:
    """One owner's part as the registry loads it back (:meth:`from_dict`)."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        if document.get("format") != PART_FORMAT or document.get("role") not in (
            "active",
            "passive",
        ):
            raise ModelFormatError(
                "not a vertical model part",
                field="model.format",
                value=document.get("format"),
                fix="load vertical parts saved by cdp-fl participant run",
            )
        self.document = dict(document)

    @property
    def role(self) -> str:
        return str(self.document["role"])

    def to_dict(self) -> dict[str, Any]:
        return dict(self.document)

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> VerticalModelPart:
        return cls(document)


registry.register_model_format(PART_FORMAT, VerticalModelPart)


def _head(model: str, role: str, party: str, objective: str, features: Sequence[str]) -> dict:
    return {
        "format": PART_FORMAT,
        "model": model,
        "role": role,
        "party": party,
        "objective": objective,
        "feature_names": list(features),
    }


def secureboost_part(
    role: str, party: str, objective: str, features: Sequence[str], fitted: Any
) -> VerticalModelPart:
    """The part of a fitted ``ActiveModel`` (active) or ``PassiveParty`` (passive)."""
    doc = _head("secureboost", role, party, objective, features)
    if role == "active":
        doc |= {
            "base_margin": float(fitted.base_margin),
            "own_splits": [[int(f), float(t)] for f, t in fitted.own_splits],
            "trees": [
                {
                    "splits": {
                        str(node): {
                            "owner": s.owner,
                            "ref": int(s.ref),
                            "left": int(s.left),
                            "right": int(s.right),
                        }
                        for node, s in sorted(tree.splits.items())
                    },
                    "leaves": {str(node): float(v) for node, v in sorted(tree.leaves.items())},
                }
                for tree in fitted.trees
            ],
        }
    else:
        doc["records"] = [[int(f), float(t)] for f, t in fitted.records]
    return VerticalModelPart(doc)


def logreg_part(
    role: str, party: str, objective: str, features: Sequence[str], fitted: Any
) -> VerticalModelPart:
    """The part of a fitted ``VerticalLogRegActive`` or ``VerticalLogRegPassive``."""
    doc = _head("logreg", role, party, objective, features)
    doc |= {
        "coef": np.asarray(fitted.coef_, dtype=float).tolist(),
        "mean": np.asarray(fitted.mean_, dtype=float).tolist(),
        "scale": np.asarray(fitted.scale_, dtype=float).tolist(),
    }
    if role == "active":
        doc["intercept"] = float(fitted.intercept_)
    return VerticalModelPart(doc)


def save_part(
    root: Path,
    part: VerticalModelPart,
    *,
    lineage: Mapping[str, Any],
    store: Store | None,
) -> tuple[str, Path, str]:
    """Save ``part`` under ``root`` (recorded in ``store``'s models table); returns the model
    id, the document's path and its SHA-256."""
    model_id, path = registry.save_model(
        root,
        kind=KIND,
        model=part,
        lineage=lineage,
        stores=[store] if store is not None else [],
        objective=str(part.document["objective"]),
        card={
            "limitations": "one owner's part of a vertical model: scoring needs every owner "
            "(cooperative scoring through the relay)"
        },
    )
    return model_id, path, hashlib.sha256(path.read_bytes()).hexdigest()
