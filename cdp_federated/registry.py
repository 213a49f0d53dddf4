"""Model registry: models as JSON (never pickle) with lineage, a content hash and a model card.

Layout: ``<root>/<model_id>/model.json`` (the estimator's ``to_dict()`` + lineage + card notes),
``model_card.md`` and ``model_card.json``. ``model_id`` is unique per saved model; ``name`` groups
versions of one model and ``version`` counts them (1, 2, ...), so ``name@version`` also finds it.

Two integrity checks on load: ``content_sha256`` inside the document (SHA-256 of the canonical
JSON of everything else) catches edits to a file that was not re-hashed; the file's SHA-256
recorded in each participant's ``models`` table when the model was published catches a rewritten
document too. Loading parses JSON only: a pickle (or anything that is not this JSON) is refused
before any of it is interpreted.

Each estimator names its document ``format`` (``to_dict()["format"]``); :func:`register_model_format`
maps a format to the class whose ``from_dict`` loads it, so a new model type plugs in with one line.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from .errors import ModelFormatError, NotFoundError
from .jobs import JobSpec
from .store import Store, schema

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "LINEAGE_DEFAULTS",
    "ModelEntry",
    "register_model_format",
    "save_model",
    "load_model",
    "load_model_document",
    "latest_model",
    "list_models",
    "resolve_model",
    "new_model_id",
    "job_spec_hash",
    "canonical_json",
]

FORMAT_VERSION = 2  # 2: name, version, objective, code_version, card notes and content_sha256
KINDS = {
    "logreg": ("binary",),
    "linear": ("regression", "binary"),
    "gbm": ("binary", "regression"),
    "vertical": ("binary", "regression"),  # one owner's part of a vertical model
}

# Estimator document format -> the class (or "module:Class", imported on first use) that loads it.
_FORMATS: dict[str, Any] = {}


def register_model_format(format_name: str, loader: Any) -> None:
    """Let the registry load documents whose ``format`` is ``format_name`` with ``loader``: a
    class with ``from_dict`` or a ``"package.module:Class"`` string resolved on first load."""
    _FORMATS[format_name] = loader


register_model_format(
    "cdp_federated.FederatedLogisticRegression",
    "cdp_federated.learning.estimators:FederatedLogisticRegression",
)
register_model_format(
    "cdp_federated.FederatedLinearRegression",
    "cdp_federated.learning.estimators:FederatedLinearRegression",
)
register_model_format(
    "cdp_federated.FederatedGBMClassifier",
    "cdp_federated.learning.gbm.estimators:FederatedGBMClassifier",
)
register_model_format(
    "cdp_federated.FederatedGBMRegressor",
    "cdp_federated.learning.gbm.estimators:FederatedGBMRegressor",
)


def _loader(format_name: Any) -> Any:
    target = _FORMATS.get(format_name) if isinstance(format_name, str) else None
    if target is None:
        raise ModelFormatError(
            "unknown model format",
            field="model.format",
            value=format_name,
            fix=f"known formats: {', '.join(sorted(_FORMATS))} (register others with "
            "cdp_federated.registry.register_model_format)",
        )
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
        _FORMATS[format_name] = target
    return target


# --- canonical JSON and hashes --------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars/arrays become Python values, NaN/inf become None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: equal documents always give equal bytes."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _content_hash(doc: Mapping[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "content_sha256"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def job_spec_hash(job: JobSpec) -> str:
    """SHA-256 of the job spec's canonical JSON (its identity in lineage)."""
    return hashlib.sha256(canonical_json(_plain(job.to_dict()))).hexdigest()


def new_model_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return now.strftime("m%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)


# --- lineage ---------------------------------------------------------------------------------------

# Every saved lineage carries these keys (missing ones are filled with the default shown).
LINEAGE_DEFAULTS: dict[str, Any] = {
    "job_id": None,
    "job_spec_hash": None,
    "purpose": None,
    "label": None,
    "features": [],
    "parties": [],
    "policies": {},  # party -> {name, version, hash}
    "funnel": {},  # party -> {rows_in, consented, trained} (None where unknown)
    "rows_per_party": {},
    "params": {},
    "rounds": None,
    "metrics": {},
    "epsilon": None,  # differential-privacy budget spent; None: no DP in this job
}


def _lineage(lineage: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any]:
    out = {**LINEAGE_DEFAULTS, **lineage}
    if not out["features"]:
        out["features"] = list(model.get("feature_names_in", []))
    if not out["parties"]:
        out["parties"] = sorted(out["rows_per_party"])
    return out


# --- save ------------------------------------------------------------------------------------------


def _versions(root: Path, name: str) -> list[int]:
    found = []
    for path in root.glob("*/model.json"):
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue  # not ours to judge here; list_models reports it
        if isinstance(doc, dict) and doc.get("name") == name:
            found.append(int(doc.get("version", 0)))
    return found


def save_model(
    root: str | Path,
    *,
    kind: str,
    model: Any,
    lineage: Mapping[str, Any],
    stores: Iterable[Store] = (),
    model_id: str | None = None,
    name: str | None = None,
    objective: str | None = None,
    card: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> tuple[str, Path]:
    """Write ``model`` (an estimator with ``to_dict`` or its dict) with its lineage and card under
    ``root``; record the file's SHA-256 in each of ``stores``. ``now`` (the clock) defaults to the
    current UTC time; ``card`` holds the owner's notes (``intended_use``, ``fairness``,
    ``limitations``). Returns ``(model_id, path of model.json)``."""
    from . import __version__
    from .registry_card import build_card, card_markdown

    if kind not in KINDS:
        raise ModelFormatError(
            "unknown model kind", field="kind", value=kind, fix=f"use one of {', '.join(KINDS)}"
        )
    objective = objective or KINDS[kind][0]
    if objective not in KINDS[kind]:
        raise ModelFormatError(
            f"objective does not fit model kind {kind!r}",
            field="objective",
            value=objective,
            fix=f"use one of {', '.join(KINDS[kind])}",
        )
    document = _plain(model.to_dict() if hasattr(model, "to_dict") else model)
    _loader(document.get("format"))  # refuse to publish what could not be loaded back
    now = now or datetime.now(UTC)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model_id = model_id or new_model_id(now)
    lineage = _plain(_lineage(lineage, document))
    name = name or lineage.get("job_id") or kind
    doc: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "name": name,
        "version": max(_versions(root, name), default=0) + 1,
        "kind": kind,
        "objective": objective,
        "created_at": now.isoformat(),
        "code_version": f"cdp-federated {__version__}",
        "model": document,
        "lineage": lineage,
        "card": _plain(dict(card or {})),
    }
    doc["content_sha256"] = _content_hash(doc)
    folder = root / model_id
    folder.mkdir(exist_ok=False)  # a taken id fails here instead of overwriting a model
    body = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False).encode()
    path = folder / "model.json"
    path.write_bytes(body)
    the_card = build_card(doc)
    (folder / "model_card.md").write_text(card_markdown(the_card))
    (folder / "model_card.json").write_text(json.dumps(the_card, indent=2, sort_keys=True))
    digest = hashlib.sha256(body).hexdigest()
    for store in stores:
        with store.begin() as conn:
            conn.execute(
                schema.models.insert(),
                [
                    {
                        "model_id": model_id,
                        "job_id": lineage.get("job_id"),
                        "kind": kind,
                        "path": str(path),
                        "sha256": digest,
                        "created_at": now,
                        "lineage": lineage,
                    }
                ],
            )
    return model_id, path


# --- load ------------------------------------------------------------------------------------------

_PICKLE_PROTOCOL_MARK = 0x80  # every pickle of protocol >= 2 starts with PROTO (0x80)


def load_model_document(path: str | Path, *, expected_sha256: str | None = None) -> dict[str, Any]:
    """The verified document at ``path``: checked against the published file checksum (when
    given) and its own ``content_sha256``. Never unpickles; anything but this JSON is refused."""
    path = Path(path)
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise ModelFormatError(
            "cannot read model file", field="path", value=str(path), fix="check the path"
        ) from exc
    if expected_sha256 is not None and hashlib.sha256(body).hexdigest() != expected_sha256:
        raise ModelFormatError(
            "model file does not match the published checksum",
            field="sha256",
            value=str(path),
            fix="the file was changed after publication; re-publish or restore it",
        )
    if body[:1] == bytes([_PICKLE_PROTOCOL_MARK]):
        raise ModelFormatError(
            "model file is a pickle; the registry never unpickles",
            field="path",
            value=str(path),
            fix="save models with cdp_federated.registry.save_model (JSON)",
        )
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise ModelFormatError(
            "model file is not JSON", field="path", value=str(path), fix="restore the file"
        ) from exc
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(
            "unsupported model format version",
            field="format_version",
            value=doc.get("format_version") if isinstance(doc, dict) else None,
            fix=f"this release reads format_version {FORMAT_VERSION}; re-train or re-publish",
        )
    if doc.get("content_sha256") != _content_hash(doc):
        raise ModelFormatError(
            "model content does not match its content_sha256 (tampered or corrupted)",
            field="content_sha256",
            value=str(path),
            fix="restore model.json from the registry or re-publish the model",
        )
    return doc


def load_model(path: str | Path, *, expected_sha256: str | None = None) -> Any:
    """The fitted scikit-learn compatible estimator saved at ``path`` (verified first)."""
    doc = load_model_document(path, expected_sha256=expected_sha256)
    model = doc.get("model")
    if not isinstance(model, dict):
        raise ModelFormatError("model document has no model", field="model", value=str(path))
    return _loader(model.get("format")).from_dict(model)


def latest_model(store: Store, model_id: str | None = None) -> tuple[str, str, str] | None:
    """(model_id, path, sha256) of ``model_id`` or of the newest model published to ``store``."""
    table = schema.models
    stmt = select(table.c.model_id, table.c.path, table.c.sha256)
    if model_id is not None:
        stmt = stmt.where(table.c.model_id == model_id)
    stmt = stmt.order_by(table.c.created_at.desc()).limit(1)
    with store.engine.connect() as conn:
        row = conn.execute(stmt).first()
    return (row[0], row[1], row[2]) if row else None


# --- browse ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One model in a registry folder; ``problem`` says why it failed verification (else None)."""

    model_id: str
    path: Path
    name: str | None = None
    version: int | None = None
    kind: str | None = None
    objective: str | None = None
    created_at: str | None = None
    metrics: Mapping[str, Any] | None = None
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "objective": self.objective,
            "created_at": self.created_at,
            "metrics": dict(self.metrics or {}),
            "path": str(self.path),
            "verified": self.problem is None,
            "problem": self.problem,
        }


def list_models(root: str | Path) -> list[ModelEntry]:
    """Every model under ``root``, verified, oldest first (a failed one carries its ``problem``)."""
    entries = []
    for path in sorted(Path(root).glob("*/model.json")):
        try:
            doc = load_model_document(path)
        except ModelFormatError as exc:
            entries.append(ModelEntry(model_id=path.parent.name, path=path, problem=exc.message))
            continue
        entries.append(
            ModelEntry(
                model_id=doc["model_id"],
                path=path,
                name=doc["name"],
                version=doc["version"],
                kind=doc["kind"],
                objective=doc["objective"],
                created_at=doc["created_at"],
                metrics=doc["lineage"].get("metrics") or {},
            )
        )
    return sorted(entries, key=lambda e: (e.created_at or "", e.model_id))


def resolve_model(root: str | Path, ref: str) -> Path:
    """``model.json`` of ``ref``: a model id, ``name@version`` or ``name`` (its latest version)."""
    root = Path(root)
    direct = root / ref / "model.json"
    if "/" not in ref and ref not in ("", ".", "..") and direct.is_file():
        return direct
    name, _, version = ref.partition("@")
    matches = [
        e
        for e in list_models(root)
        if e.problem is None and e.name == name and (not version or str(e.version) == version)
    ]
    if not matches:
        raise NotFoundError(
            "no such model in the registry",
            field="ID",
            value=ref,
            fix=f"see `cdp-fl models list --registry {root}` (ID, NAME@VERSION or NAME)",
        )
    return max(matches, key=lambda e: e.version or 0).path
