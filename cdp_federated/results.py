"""The one result schema shared by every command's ``--json`` output.

Commands fill the keys that apply to them and never invent others; a test checks that the README
documents every key here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RESULT_FIELDS", "make_result"]

RESULT_FIELDS: dict[str, str] = {
    "command": "the cdp-fl command that produced the result",
    "status": "'ok' or 'refused' / 'failed'",
    "auc": "ROC AUC of the federated model on held-out rows (computed from aggregated score histograms)",
    "centralized_auc": "ROC AUC of scikit-learn trained on the pooled training rows (simulations only)",
    "logloss": "mean log loss of the federated model on held-out rows",
    "accuracy": "accuracy at threshold 0.5 on held-out rows",
    "rows_per_party": "training rows each party used after consent: {party: rows}",
    "test_rows_per_party": "held-out rows each party evaluated: {party: rows}",
    "funnel": "per party: rows in the source, after consent, trained on",
    "rounds": "training rounds completed",
    "seconds": "wall time of the command",
    "databases": "participant -> database URL (password masked)",
    "model_path": "path of the saved model.json",
    "model_id": "registry id of the saved model",
    "gbm": "demo: the histogram GBM trained on the same rows {auc, centralized_auc, logloss, trees, seconds, model_id, model_path}",
    "card_path": "path of the saved model's Markdown model card",
    "rmse": "root mean squared error of the federated model on held-out rows (regression)",
    "centralized_rmse": "RMSE of scikit-learn trained on the pooled training rows (simulations only)",
    "ece": "expected calibration error on held-out rows, from aggregated score histograms (binary)",
    "features": "feature columns the model was trained on",
    "ingest": "per source: received, applied, duplicates, dead_lettered",
    "received": "events read",
    "applied": "events applied",
    "duplicates": "events skipped because their messageId was already applied",
    "dead_lettered": "events written to the dead-letter table with their reason",
    "events_per_second": "ingest throughput",
    "profiles": "profiles with features written",
    "policy": "the policy the job ran under: {name, version, hash} (hash = SHA-256 of its canonical JSON)",
    "audit": "per participant: its audit log's signed head after the job {entries, head, key_id}",
    "rows": "data rows read from an import file",
    "records": "consent ledger records an import expanded to",
    "inserted": "records new to the ledger (the rest were imported before)",
    "batches": "ingest transactions committed",
    "method": "identity alignment method: psi or salted-hash",
    "intersection_size": 'customers in both sets ("<k" below the policy\'s minimum cohort size)',
    "left_size": "identifier rows read for the left (receiving) party",
    "right_size": "identifier rows read for the right party",
    "bytes_exchanged": "bytes of protocol messages between the parties",
    "invalid": "per party: identifiers that failed normalisation (never matched)",
    "alignment_files": "per party: file holding its matched row numbers in the common order",
    "label_party_only_auc": "ROC AUC of the same model trained by the label party alone on its own features (vertical)",
    "label_party_only_rmse": "RMSE of the same model trained by the label party alone on its own features (vertical)",
    "test_intersection_size": "test rows aligned across every party (vertical)",
    "he": "homomorphic encryption scheme and key size, e.g. paillier-2048 (vertical)",
    "epsilon": "differential privacy: epsilon the job spends (client-level, by the accountant in lineage), at delta",
    "delta": "differential privacy: the delta of the reported epsilon",
    "noise_multiplier": "differential privacy: Gaussian noise standard deviation over the clip norm, per round",
    "sampling_rate": "differential privacy: probability that a party is asked in a round (Poisson sampling)",
    "bytes_sent": "codec frame bytes of the participants' replies to training requests (model updates, compressed with --compress; GBM histograms), summed over rounds; with --secure-aggregation the replies to every stage plus the share packets posted to the relay",
    "secure_aggregation": "secure aggregation: {participants, dropped, recovered}: parties in the job, participant-rounds that dropped out (any stage), and of those the ones dropped after key sharing whose masks were rebuilt from the survivors' shares and removed from the sum; with --compress int8|int4 also compression: {scheme, code_ring_bits, uncompressed_rounds} (the narrow ring the codes are summed in, and the rounds sent uncompressed while the shared scale was measured)",
}


def make_result(**values: Any) -> dict[str, Any]:
    """A result dict, refusing keys outside :data:`RESULT_FIELDS` (a programming error)."""
    unknown = set(values) - set(RESULT_FIELDS)
    if unknown:
        raise KeyError(f"result keys not in the shared schema: {sorted(unknown)}")
    return dict(values)
