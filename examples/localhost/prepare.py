"""Make the three participants' stores for the localhost federation (run by run.sh).

Each region's synthetic Segment log (``cdp_federated.demo_data``) is ingested into that region's
own SQLite store, with its consent ledger, and per-profile features and the 30-day purchase label
are derived as of the scenario's cutoff, exactly as ``cdp-fl demo`` does before training. The
participants later read these stores through the SQL connector declared in their YAML files.

    .venv/bin/python examples/localhost/prepare.py OUT_DIR [--customers N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdp_federated.consent.active import activate_policy
from cdp_federated.demo_data import generate_scenario
from cdp_federated.features import build_features, build_labels, read_events
from cdp_federated.governance.policy import load_policy
from cdp_federated.host import Host
from cdp_federated.plugins import make_plugin_manager
from cdp_federated.settings import normalize_db_url
from cdp_federated.store import TCF_VENDORS_META, open_store

HERE = Path(__file__).resolve().parent
POLICY = HERE.parents[1] / "policies" / "internal-regions.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    pm = make_plugin_manager()
    policy = load_policy(POLICY)
    scenario = generate_scenario(out / "events", seed=args.seed, customers=args.customers)
    vendors = sorted(
        {p.tcf.vendor_id for p in policy.consent.purposes if p.tcf and p.tcf.vendor_id}
    )
    summary = {}
    for name, events in scenario.region_files.items():
        store = open_store(normalize_db_url(out / f"{name}.sqlite"), create=True)
        store.set_meta(TCF_VENDORS_META, ",".join(map(str, vendors)))
        activate_policy(store, policy)
        stats = Host(store, pm).ingest_path(events)
        frame = read_events(store).collect().lazy()
        build_features(store, scenario.cutoff, events=frame)
        build_labels(
            store,
            scenario.cutoff,
            name="purchased_30d",
            window_days=scenario.label_window_days,
            events=frame,
        )
        store.dispose()
        summary[name] = stats.to_dict()
    print(json.dumps({"cutoff": scenario.cutoff.isoformat(), "ingest": summary}))


if __name__ == "__main__":
    main()
