"""Make the vertical example's two parties (run by run.sh; the tests import :func:`prepare`).

* ``shop.csv`` (Acme Retail, the label party): raw email addresses as written in its CRM (some in
  capitals), basket features and the ``purchased`` label.
* ``brand.csv`` (Globex Brands): only the hex SHA-256 of normalised emails, and brand engagement
  features. The shop holds the first 85% of the customers, the brand the last 85%, each file in
  its own shuffled order, so 70% are in both.

Each party gets its own store (``shop.sqlite``, ``brand.sqlite``) with the policy activated and
its customers' analytics consent imported, keyed by its own identifier column.

    .venv/bin/python examples/vertical/prepare.py OUT_DIR [--customers N] [--seed S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl

from cdp_federated.consent.active import activate_policy
from cdp_federated.consent.imports import import_signals_csv
from cdp_federated.governance.policy import load_policy
from cdp_federated.settings import normalize_db_url
from cdp_federated.store import open_store

HERE = Path(__file__).resolve().parent
POLICY = HERE / "policy.yaml"
CONSENT_AT = "2026-01-15T00:00:00+00:00"


def email_hash(address: str) -> str:
    """What the brand keeps: the hex SHA-256 of the normalised (trimmed, lower-case) address."""
    return hashlib.sha256(address.strip().lower().encode()).hexdigest()


def prepare(
    out: Path, *, customers: int = 1000, seed: int = 7, label_at_brand: bool = False
) -> dict[str, int]:
    """Write both parties' files and stores under ``out``; returns row counts.
    ``label_at_brand`` also gives the brand a ``purchased`` column (a policy violation)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)  # noqa: TID251 - seeded synthetic example data
    n = customers
    emails = [f"customer{i}@example.com" for i in range(n)]
    age = rng.integers(18, 80, n).astype(float)
    visits = rng.poisson(4, n).astype(float)
    basket = np.round(rng.gamma(2.0, 30.0, n), 2)
    affinity = np.round(rng.normal(size=n), 4)
    brand_visits = rng.poisson(2, n).astype(float)
    margin = 0.9 * affinity - 0.5 * (brand_visits - 2) + 0.3 * (visits - 4) + 0.01 * (basket - 60)
    purchased = (margin + rng.normal(scale=0.6, size=n) > 0).astype(int)
    shop_rows = rng.permutation(np.arange(0, int(0.85 * n)))
    brand_rows = rng.permutation(np.arange(int(0.15 * n), n))
    # CRM spelling: some addresses in capitals (normalised before PSI)
    written = [
        e.upper() if i % 7 == 0 else (e.capitalize() if i % 5 == 0 else e)
        for i, e in enumerate(emails)
    ]
    shop = pl.DataFrame(
        {
            "email": [written[i] for i in shop_rows],
            "age": age[shop_rows],
            "visits": visits[shop_rows],
            "basket_value": basket[shop_rows],
            "purchased": purchased[shop_rows],
        }
    )
    brand_columns = {
        "email_sha256": [email_hash(emails[i]) for i in brand_rows],
        "affinity": affinity[brand_rows],
        "brand_visits": brand_visits[brand_rows],
    }
    if label_at_brand:
        brand_columns["purchased"] = purchased[brand_rows]
    brand = pl.DataFrame(brand_columns)
    policy = load_policy(POLICY)
    for name, frame, key in (("shop", shop, "email"), ("brand", brand, "email_sha256")):
        frame.write_csv(out / f"{name}.csv")
        consent = pl.DataFrame(
            {
                "profile_id": frame[key],
                "signal": "segment:Analytics",
                "granted": "true",
                "timestamp": "2026-01-01T00:00:00Z",
                "jurisdiction": "EU",
            }
        )
        consent.write_csv(out / f"{name}-consent.csv")
        store = open_store(normalize_db_url(out / f"{name}.sqlite"), create=True)
        try:
            activate_policy(store, policy)
            import_signals_csv(store, out / f"{name}-consent.csv")
        finally:
            store.dispose()
    return {"shop": shop.height, "brand": brand.height, "both": int(0.7 * n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(json.dumps(prepare(args.out, customers=args.customers, seed=args.seed)))


if __name__ == "__main__":
    main()
