"""Shared policy texts for the governance tests."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
TEMPLATES = sorted(POLICIES.glob("*.yaml"))

# A two-organisation policy exercising every section (DP budget, secure aggregation, TCF, GPC).
PARTNER_POLICY = """\
policy: test-partners
version: 2
description: retailer and brand
purposes:
  allowed: [model_training, audience_modeling]
  lawful_basis: consent
consent:
  unknown_jurisdiction: deny
  jurisdictions:
    opt_in: [EU, UK]
    opt_out: [US]
  purposes:
    model_training:
      signals: [segment:Analytics, rudderstack:C0002]
      opt_out_signals: []
      tcf: {purposes: [1, 7, 9, 10], vendor_id: 1234, basis: consent}
    audience_modeling:
      signals: [segment:Advertising]
      opt_out_signals: [gpc:sale_sharing]
partners:
  - {name: retailer-eu, organisation: acme-retail, region: EU, roles: [participant, label_holder]}
  - {name: brand-eu, organisation: globex-brands, region: EU, roles: [participant]}
  - {name: coordinator-eu, organisation: acme-retail, region: EU, roles: [coordinator]}
features:
  allowed: ["*"]
  forbidden: ["*_id", jurisdiction]
residency:
  data_regions: [EU]
  coordinator_regions: [EU]
minimums:
  rows_per_party: 500
  cohort_size: 20
identity:
  methods: [psi]
privacy:
  secure_aggregation: required
  dp:
    epsilon_per_run: 2.0
    delta: 1.0e-6
    budget: {epsilon: 8.0, window_days: 30}
outputs:
  uses: [scoring, audience_export]
  retention_days: 365
"""


@pytest.fixture
def partner_policy_text() -> str:
    return PARTNER_POLICY
