"""Model registry: models as JSON (never pickle) with lineage and a model card.

Layout: ``<root>/<model_id>/model.json`` (estimator parameters + lineage), ``model_card.md`` and
``model_card.json``. Each store the model is published to records its path and sha256, so a
loaded file is checked against what was published before it is trusted.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from .errors import ModelFormatError
from .store import Store, schema

__all__ = [
    "FORMAT_VERSION",
    "save_model",
    "load_model",
    "load_model_document",
    "latest_model",
    "new_model_id",
]

FORMAT_VERSION = 1


def new_model_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return now.strftime("m%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)


def _estimator_classes() -> dict[str, Any]:
    from .learning.estimators import FederatedLogisticRegression

    return {"logreg": FederatedLogisticRegression}


def _card_markdown(doc: dict[str, Any]) -> str:
    lineage = doc["lineage"]
    lines = [
        f"# Model card: {doc['model_id']}",
        "",
        f"- **Kind:** {doc['kind']}",
        f"- **Created:** {doc['created_at']}",
        f"- **Job:** {lineage.get('job_id', '-')}, purpose `{lineage.get('purpose', '-')}`",
        f"- **Parties:** {', '.join(lineage.get('parties', []))}",
        f"- **Features:** {', '.join(doc['model'].get('feature_names_in', []))}",
        f"- **Label:** {lineage.get('label', '-')}",
        "",
        "## Rows per party (train, after consent)",
        "",
        "| party | rows |",
        "|---|---|",
    ]
    for party, rows in lineage.get("rows_per_party", {}).items():
        lines.append(f"| {party} | {rows} |")
    metrics = lineage.get("metrics", {})
    if metrics:
        lines += ["", "## Evaluation (held-out customers, federated)", ""]
        lines += [f"- {k}: {v}" for k, v in metrics.items()]
    lines += [
        "",
        "## Intended use and limits",
        "",
        f"Scores profiles for `{lineage.get('purpose', '-')}` only where consent allows it. Trained "
        "without moving rows between parties; the coordinator saw parameters and aggregates only.",
        "",
    ]
    return "\n".join(lines)


def save_model(
    root: str | Path,
    *,
    kind: str,
    model: dict[str, Any],
    lineage: dict[str, Any],
    stores: Iterable[Store] = (),
    model_id: str | None = None,
    now: datetime | None = None,
) -> tuple[str, Path]:
    """Write the model and its card; record it in each of ``stores``. Returns (model_id, path)."""
    now = now or datetime.now(UTC)
    model_id = model_id or new_model_id(now)
    folder = Path(root) / model_id
    folder.mkdir(parents=True, exist_ok=False)
    doc = {
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "kind": kind,
        "created_at": now.isoformat(),
        "model": model,
        "lineage": lineage,
    }
    body = json.dumps(doc, indent=2, sort_keys=True).encode()
    path = folder / "model.json"
    path.write_bytes(body)
    (folder / "model_card.md").write_text(_card_markdown(doc))
    card = {k: doc[k] for k in ("model_id", "kind", "created_at", "lineage")}
    (folder / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
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


def load_model_document(path: str | Path, *, expected_sha256: str | None = None) -> dict[str, Any]:
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
            fix=f"this release reads format_version {FORMAT_VERSION}",
        )
    return doc


def load_model(path: str | Path, *, expected_sha256: str | None = None) -> Any:
    """The fitted estimator saved at ``path``."""
    doc = load_model_document(path, expected_sha256=expected_sha256)
    classes = _estimator_classes()
    cls = classes.get(doc.get("kind"))
    if cls is None:
        raise ModelFormatError(
            "unknown model kind",
            field="kind",
            value=doc.get("kind"),
            fix=f"known kinds: {', '.join(classes)}",
        )
    return cls.from_dict(doc["model"])


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
