"""Model cards: one JSON structure built from a verified registry document, rendered as Markdown.

Both forms come from the same data, so they cannot disagree. Sections the pipeline cannot know
(fairness analysis, known limitations) carry a placeholder until the owner writes them in the
``card`` notes given to :func:`cdp_federated.registry.save_model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PLACEHOLDER", "build_card", "card_markdown"]

PLACEHOLDER = "TO BE COMPLETED by the model owner"
_METRIC_ORDER = ("auc", "logloss", "accuracy", "ece", "rmse", "mae", "r2")


def _intended_use(doc: Mapping[str, Any]) -> str:
    purpose = doc["lineage"].get("purpose")
    if not purpose:
        return PLACEHOLDER
    return (
        f"Scores profiles for the purpose `{purpose}` only, where each party's consent rule for "
        "that purpose allows it. Trained without moving rows between parties: the coordinator saw "
        "parameters and aggregates only."
    )


def build_card(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The card's content as a JSON-ready dict (see the module docstring)."""
    lineage = doc["lineage"]
    notes = doc.get("card") or {}
    metrics = dict(lineage.get("metrics") or {})
    return {
        "model_id": doc["model_id"],
        "name": doc["name"],
        "version": doc["version"],
        "kind": doc["kind"],
        "objective": doc["objective"],
        "created_at": doc["created_at"],
        "code_version": doc["code_version"],
        "content_sha256": doc["content_sha256"],
        "intended_use": notes.get("intended_use") or _intended_use(doc),
        "job": {
            "job_id": lineage.get("job_id"),
            "job_spec_hash": lineage.get("job_spec_hash"),
            "purpose": lineage.get("purpose"),
            "params": lineage.get("params") or {},
            "rounds": lineage.get("rounds"),
        },
        "data": {
            "label": lineage.get("label"),
            "features": list(lineage.get("features") or []),
            "parties": list(lineage.get("parties") or []),
            "rows_per_party": dict(lineage.get("rows_per_party") or {}),
            "consent_funnel": dict(lineage.get("funnel") or {}),
        },
        "policies": dict(lineage.get("policies") or {}),
        "metrics": {k: metrics[k] for k in sorted(metrics, key=_metric_rank)},
        "calibration": lineage.get("calibration") or [],
        "privacy": {"epsilon": lineage.get("epsilon")},
        "fairness": notes.get("fairness") or PLACEHOLDER,
        "limitations": notes.get("limitations") or PLACEHOLDER,
    }


def _metric_rank(name: str) -> tuple[int, str]:
    return (_METRIC_ORDER.index(name) if name in _METRIC_ORDER else len(_METRIC_ORDER), name)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card as Markdown."""
    job, data = card["job"], card["data"]
    lines = [
        f"# Model card: {card['name']} v{card['version']}",
        "",
        f"- **Model id:** `{card['model_id']}`",
        f"- **Kind:** {card['kind']} ({card['objective']})",
        f"- **Created:** {card['created_at']} by {card['code_version']}",
        f"- **Content SHA-256:** `{card['content_sha256']}`",
        f"- **Job:** {_cell(job['job_id'])} (spec hash `{_cell(job['job_spec_hash'])}`), "
        f"{_cell(job['rounds'])} rounds",
        f"- **Label:** {_cell(data['label'])}",
        f"- **Features:** {', '.join(data['features']) or '-'}",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Parties and consent funnel",
        "",
        "| party | rows in | consented | trained | policy | policy hash |",
        "|---|---|---|---|---|---|",
    ]
    for party in data["parties"]:
        funnel = data["consent_funnel"].get(party) or {}
        policy = card["policies"].get(party) or {}
        trained = funnel.get("trained", data["rows_per_party"].get(party))
        label = f"{policy['name']} v{policy.get('version', '?')}" if policy.get("name") else "-"
        lines.append(
            f"| {party} | {_cell(funnel.get('rows_in'))} | {_cell(funnel.get('consented'))} "
            f"| {_cell(trained)} | {label} | `{_cell(policy.get('hash'))}` |"
        )
    lines += ["", "## Metrics (held-out rows)", ""]
    metrics = card["metrics"]
    lines += [f"- {k}: {_cell(metrics[k])}" for k in sorted(metrics, key=_metric_rank)] or [
        "- none recorded"
    ]
    if card["calibration"]:
        lines += [
            "",
            "## Calibration (reliability table)",
            "",
            "| predicted in | rows | mean predicted | observed rate |",
            "|---|---|---|---|",
        ]
        for row in card["calibration"]:
            lines.append(
                f"| [{row['lower']:.1f}, {row['upper']:.1f}) | {row['count']} "
                f"| {_cell(row['mean_predicted'])} | {_cell(row['observed_rate'])} |"
            )
    epsilon = card["privacy"]["epsilon"]
    lines += [
        "",
        "## Privacy",
        "",
        "Differential privacy: not applied." if epsilon is None else f"Epsilon spent: {epsilon}",
        "",
        "## Training parameters",
        "",
    ]
    lines += [f"- {k}: {_cell(v)}" for k, v in sorted(job["params"].items())] or ["- defaults"]
    lines += [
        "",
        "## Fairness",
        "",
        card["fairness"],
        "",
        "## Limitations",
        "",
        card["limitations"],
        "",
    ]
    return "\n".join(lines)
