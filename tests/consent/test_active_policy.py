"""A store's active policy: recorded once, reloaded with the same hash, used by scoring and status."""

from __future__ import annotations

import json
from pathlib import Path

from cdp_federated.consent.active import active_rule
from cdp_federated.consent.purposes import DEFAULT_PURPOSES
from cdp_federated.governance.policy import load_policy
from cdp_federated.store import open_store
from tests.cli_helpers import run

POLICIES = Path(__file__).parents[2] / "policies"


def test_activate_then_rules_come_from_the_policy(monkeypatch, capsys, tmp_path):
    db = str(tmp_path / "p.sqlite")
    store = open_store(f"sqlite:///{db}", create=True)
    assert active_rule(store, "model_training") == DEFAULT_PURPOSES["model_training"]
    path = POLICIES / "ccpa-regional.yaml"
    code, out, _ = run(monkeypatch, capsys, "policy", "activate", str(path), "--db", db)
    policy = load_policy(path)
    assert code == 0 and policy.content_hash in out
    rule = active_rule(store, "audience_modeling")
    assert rule == policy.purpose_rule("audience_modeling")
    assert rule.opt_out_signals == ("gpc:sale_sharing",) and rule.opt_in_prefixes == ()
    assert active_rule(store, "personalization") is None  # not permitted by this policy
    code, _, err = run(
        monkeypatch, capsys, "consent", "status", "x", "--purpose", "personalization", "--db", db
    )
    assert code == 2 and "active policy does not permit" in err
    code, out, _ = run(
        monkeypatch,
        capsys,
        "consent",
        "status",
        "x",
        "--purpose",
        "audience_modeling",
        "--db",
        db,
        "--json",
    )
    assert code == 1 and json.loads(out)["allowed"] is False  # unknown profile: nothing allows it
    store.dispose()


def test_every_template_reloads_from_the_store_with_its_hash(tmp_path):
    from cdp_federated.consent.active import ACTIVE_POLICY_META, activate_policy

    store = open_store(f"sqlite:///{tmp_path / 'p.sqlite'}", create=True)
    for path in sorted(POLICIES.glob("*.yaml")):
        policy = load_policy(path)
        activate_policy(store, policy)
        assert load_policy(store.get_meta(ACTIVE_POLICY_META)).content_hash == policy.content_hash
    store.dispose()
