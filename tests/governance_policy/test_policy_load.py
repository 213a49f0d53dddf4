"""Loading policies: templates, schema errors with their lines, semantic checks, the content hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from cdp_federated.consent.purposes import DEFAULT_PURPOSES
from cdp_federated.demo_data import REGIONS
from cdp_federated.errors import ConfigError, PolicySchemaError, PolicyViolation
from cdp_federated.features import FEATURE_COLUMNS
from cdp_federated.governance.policy import (
    ConsentRule,
    TCFRequirement,
    load_policy,
    pii_term,
    policy_schema,
)

from .conftest import PARTNER_POLICY, POLICIES, ROOT, TEMPLATES


def errors_of(text: str) -> PolicySchemaError:
    with pytest.raises(PolicySchemaError) as info:
        load_policy(text)
    return info.value


def located(err: PolicySchemaError) -> set[tuple[int | None, str]]:
    return {(line, path) for line, path, _ in err.errors}


# --- Templates and the published schema ------------------------------------------------------------


def test_the_three_templates_exist_and_validate():
    names = {p.name for p in TEMPLATES}
    assert names == {
        "gdpr-partner-collaboration.yaml",
        "ccpa-regional.yaml",
        "internal-regions.yaml",
    }
    for path in TEMPLATES:
        policy = load_policy(path)
        assert policy.name == path.stem
        assert len(policy.content_hash) == 64


def test_published_schema_copy_is_identical_to_the_package_data():
    package = ROOT / "cdp_federated" / "governance" / "policy_schema.json"
    assert (POLICIES / "policy.schema.json").read_bytes() == package.read_bytes(), (
        "run: cp cdp_federated/governance/policy_schema.json policies/policy.schema.json"
    )


def test_schema_is_valid_draft_2020_12_and_closes_every_object():
    schema = policy_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"

    def objects(node):
        if isinstance(node, dict):
            if node.get("type") == "object":
                yield node
            for value in node.values():
                yield from objects(value)
        elif isinstance(node, list):
            for value in node:
                yield from objects(value)

    for obj in objects(schema):
        # closed: either false, or (consent.purposes) a schema every entry must match
        assert "additionalProperties" in obj, obj


def test_internal_regions_permits_the_demo_parties_and_features():
    policy = load_policy(POLICIES / "internal-regions.yaml")
    participants = {p.name for p in policy.partners if "participant" in p.roles}
    assert participants == {r.name for r in REGIONS}
    assert set(policy.features.allowed) == set(FEATURE_COLUMNS)
    assert len(policy.organisations) == 1 and "salted_hash" in policy.identity.methods
    assert policy.privacy.secure_aggregation == "optional"


def test_internal_regions_consent_rule_is_the_built_in_default_plus_the_retailers_cmp():
    """The demo's policy: the built-in signals, plus TC strings of the retailer's own CMP."""
    rule = load_policy(POLICIES / "internal-regions.yaml").purpose_rule("model_training")
    default = DEFAULT_PURPOSES["model_training"]
    assert set(rule.signals) == set(default.signals)
    assert set(rule.opt_out_signals) == set(default.opt_out_signals)
    assert set(rule.opt_in_prefixes) == set(default.opt_in_prefixes)
    assert set(rule.opt_out_prefixes) == set(default.opt_out_prefixes)
    assert rule.unknown_default is False
    assert (rule.tcf.purposes, rule.tcf.vendor_id, rule.tcf.basis) == (
        (1, 7, 8, 9, 10),
        1234,
        "consent",
    )


def test_gdpr_template_is_two_organisations_psi_only_eu_with_a_budget():
    policy = load_policy(POLICIES / "gdpr-partner-collaboration.yaml")
    assert len(policy.organisations) == 2
    assert policy.identity.methods == ("psi",)
    assert policy.residency.data_regions == ("EU",)
    assert policy.privacy.secure_aggregation == "required"
    assert policy.privacy.dp is not None and policy.privacy.dp.budget is not None


def test_ccpa_template_is_us_opt_out_honouring_gpc():
    policy = load_policy(POLICIES / "ccpa-regional.yaml")
    rule = policy.purpose_rule("audience_modeling")
    assert rule.opt_out_prefixes == ("US",) and rule.opt_in_prefixes == ()
    assert "gpc:sale_sharing" in rule.opt_out_signals
    assert "gpc:sale_sharing" not in rule.signals


# --- purpose_rule ----------------------------------------------------------------------------------


def test_purpose_rule_returns_what_the_ledger_needs():
    policy = load_policy(PARTNER_POLICY)
    assert policy.purpose_rule("model_training") == ConsentRule(
        purpose="model_training",
        signals=("rudderstack:C0002", "segment:Analytics"),
        opt_out_signals=(),
        tcf=TCFRequirement(purposes=(1, 7, 9, 10), vendor_id=1234, basis="consent"),
        opt_in_prefixes=("EU", "UK"),
        opt_out_prefixes=("US",),
        unknown_default=False,
    )
    assert policy.purpose_rule("audience_modeling").opt_out_signals == ("gpc:sale_sharing",)


def test_purpose_rule_refuses_a_purpose_the_policy_does_not_allow():
    policy = load_policy(PARTNER_POLICY)
    with pytest.raises(PolicyViolation) as info:
        policy.purpose_rule("personalization")
    assert info.value.field == "purpose" and info.value.value == "personalization"


def test_unknown_jurisdiction_allow_sets_the_unknown_default():
    text = PARTNER_POLICY.replace("unknown_jurisdiction: deny", "unknown_jurisdiction: allow")
    assert load_policy(text).purpose_rule("model_training").unknown_default is True


# --- Errors with line numbers ----------------------------------------------------------------------

BROKEN = """\
policy: broken
version: 1
purposes:
  allowed: [model_training]
  lawful_basis: consent
consent:
  unknown_jurisdiction: maybe
  jurisdictions:
    opt_in: [EU, eu]
    opt_out: [US]
  purposes:
    model_training:
      signals: [segment:Analytics]
      opt_out_signal: [gpc:sale_sharing]
partners:
  - {name: a, organisation: acme, region: EU, roles: [participant]}
  - {name: c, organisation: acme, region: EU, roles: [coordinator, boss]}
features:
  alowed: ["*"]
residency:
  data_regions: [EU]
  coordinator_regions: [EU]
minimums: {rows_per_party: 0, cohort_size: 10}
identity: {methods: [psi]}
privacy:
  secure_aggregation: required
  dp: {epsilon_per_run: 2.0, delta: 1e-6}
outputs: {uses: [scoring], retention_days: 365}
"""


def test_every_schema_error_is_reported_with_its_line_and_path():
    err = errors_of(BROKEN)
    assert located(err) == {
        (7, "consent.unknown_jurisdiction"),
        (9, "consent.jurisdictions.opt_in[1]"),
        (14, "consent.purposes.model_training.opt_out_signal"),
        (17, "partners[1].roles[1]"),
        (18, "features.allowed"),  # missing: the line of the mapping that lacks it
        (19, "features.alowed"),
        (23, "minimums.rows_per_party"),
        (27, "privacy.dp.delta"),
    }
    assert [e[0] for e in err.errors] == sorted(e[0] for e in err.errors)
    assert "8 policy errors" in err.message and "line 7" in err.message
    assert err.field == "consent.unknown_jurisdiction"


def test_error_messages_say_what_to_do():
    messages = {path: msg for _, path, msg in errors_of(BROKEN).errors}
    assert "did you mean 'allowed'" in messages["features.alowed"]
    assert (
        "did you mean 'opt_out_signals'"
        in messages["consent.purposes.model_training.opt_out_signal"]
    )
    assert "missing required key 'allowed'" in messages["features.allowed"]
    assert "deny, allow" in messages["consent.unknown_jurisdiction"]
    assert "upper-case" in messages["consent.jurisdictions.opt_in[1]"]
    assert "1.0e-6" in messages["privacy.dp.delta"]


@pytest.mark.parametrize(
    ("old", "new", "line", "path"),
    [
        ("version: 2", "verison: 2", 2, "verison"),
        ("    opt_in: [EU, UK]", "    optin: [EU, UK]", 10, "consent.jurisdictions.optin"),
        ("  retention_days: 365", "  retention_day: 365", 43, "outputs.retention_day"),
        (
            "      opt_out_signals: []\n      tcf",
            "      opt_out_signals: []\n      tfc",
            16,
            "consent.purposes.model_training.tfc",
        ),
        (
            "    budget: {epsilon: 8.0,",
            "    budget: {epsilon: 8.0, windw: 3,",
            40,
            "privacy.dp.budget.windw",
        ),
    ],
)
def test_a_misspelt_key_is_caught_at_its_line(old, new, line, path):
    assert old in PARTNER_POLICY
    err = errors_of(PARTNER_POLICY.replace(old, new, 1))
    assert (line, path) in located(err)
    assert any("unknown key" in msg for _, p, msg in err.errors if p == path)


def test_yaml_syntax_error_reports_line_and_column():
    text = PARTNER_POLICY.replace("  lawful_basis: consent", "  lawful_basis: [consent", 1)
    err = errors_of(text)
    assert len(err.errors) == 1
    line, path, msg = err.errors[0]
    assert line is not None and 5 <= line <= 7
    assert path == "" and "YAML syntax error" in msg and "column" in msg


def test_duplicate_keys_are_errors_not_silently_overwritten():
    text = PARTNER_POLICY.replace(
        "  retention_days: 365\n", "  retention_days: 365\n  retention_days: 3650\n"
    )
    err = errors_of(text)
    assert located(err) == {(44, "outputs.retention_days")}
    assert "first at line 43" in err.errors[0][2]


def test_yaml_booleans_get_a_quoting_hint():
    err = errors_of(PARTNER_POLICY.replace("opt_out: [US]", "opt_out: [US, NO]"))
    ((line, path, msg),) = err.errors
    assert (line, path) == (11, "consent.jurisdictions.opt_out[1]")
    assert "quote" in msg


def test_a_bad_purpose_name_points_at_the_key():
    text = PARTNER_POLICY.replace("    audience_modeling:\n", "    Audience-Modeling:\n", 1)
    assert (17, "consent.purposes.Audience-Modeling") in located(errors_of(text))


@pytest.mark.parametrize("text", ["", "just a string", "- a\n- list\n"])
def test_a_document_that_is_not_a_mapping_is_refused(text):
    err = errors_of(text)
    assert len(err.errors) == 1 and "document" in err.errors[0][2]


def test_missing_file_is_a_policy_schema_error(tmp_path):
    with pytest.raises(PolicySchemaError) as info:
        load_policy(tmp_path / "nope.yaml")
    assert isinstance(info.value, ConfigError) and "cannot read" in info.value.message


# --- Semantic checks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "line", "path", "words"),
    [
        ("opt_out: [US]", "opt_out: [US, EU]", 11, "consent.jurisdictions.opt_out[1]", "both"),
        (
            "opt_in: [EU, UK]",
            "opt_in: [EU, UK, US]",
            11,
            "consent.jurisdictions.opt_out[0]",
            "both",
        ),
        (
            "allowed: [model_training, audience_modeling]",
            "allowed: [model_training]",
            17,
            "consent.purposes.audience_modeling",
            "not in purposes.allowed",
        ),
        (
            "allowed: [model_training, audience_modeling]",
            "allowed: [model_training, audience_modeling, personalization]",
            5,
            "purposes.allowed[2]",
            "no consent.purposes entry",
        ),
        (
            "signals: [segment:Advertising]",
            "signals: [segment:Advertising, gpc:sale_sharing]",
            18,
            "consent.purposes.audience_modeling.signals[1]",
            "opt_out_signals",
        ),
        (
            "signals: [segment:Advertising]",
            "signals: []",
            17,
            "consent.purposes.audience_modeling",
            "never be used",
        ),
        (
            "basis: consent}",
            "basis: legitimate_interest}",
            16,
            "consent.purposes.model_training.tcf.purposes",
            "TCF v2.2",
        ),
        (
            "{name: brand-eu,",
            "{name: retailer-eu,",
            22,
            "partners[1].name",
            "listed twice",
        ),
        (
            "{name: coordinator-eu, organisation: acme-retail, region: EU",
            "{name: coordinator-eu, organisation: acme-retail, region: US",
            23,
            "partners[2].region",
            "coordinator_regions",
        ),
        (
            "{name: brand-eu, organisation: globex-brands, region: EU",
            "{name: brand-eu, organisation: globex-brands, region: UK",
            22,
            "partners[1].region",
            "data_regions",
        ),
        ("methods: [psi]", "methods: [psi, salted_hash]", 34, "identity.methods[1]", "dictionary"),
        ('allowed: ["*"]', 'allowed: ["*", Email_Address]', 25, "features.allowed[1]", "PII"),
        (
            "epsilon_per_run: 2.0",
            "epsilon_per_run: 9.0",
            38,
            "privacy.dp.epsilon_per_run",
            "budget",
        ),
        ("delta: 1.0e-6", "delta: 0.01", 39, "privacy.dp.delta", "1/rows_per_party"),
    ],
)
def test_semantic_contradictions_are_reported_at_their_line(old, new, line, path, words):
    assert old in PARTNER_POLICY
    err = errors_of(PARTNER_POLICY.replace(old, new, 1))
    assert (line, path) in located(err), err.errors
    assert any(words in msg for _, p, msg in err.errors if p == path)


def test_an_opt_out_prefix_shadowed_by_an_opt_in_prefix_is_an_error():
    text = PARTNER_POLICY.replace("opt_in: [EU, UK]", "opt_in: [EU, UK, US]").replace(
        "opt_out: [US]", "opt_out: [US-CA]"
    )
    ((line, path, msg),) = errors_of(text).errors
    assert (line, path) == (11, "consent.jurisdictions.opt_out[0]")
    assert "opt_in 'US' covers it" in msg


def test_an_opt_in_prefix_may_refine_an_opt_out_one():
    text = PARTNER_POLICY.replace("opt_in: [EU, UK]", "opt_in: [EU, UK, US-CA]")
    assert load_policy(text).consent.opt_in == ("EU", "UK", "US-CA")


def test_schema_and_semantic_errors_are_reported_together():
    text = PARTNER_POLICY.replace("version: 2", "version: two").replace(
        "methods: [psi]", "methods: [psi, salted_hash]"
    )
    assert located(errors_of(text)) == {(2, "version"), (34, "identity.methods[1]")}


# --- Content hash ----------------------------------------------------------------------------------

REFORMATTED = """\
# the same policy, written differently: flow style, other key and list orders, comments,
# integers for floats, optional defaults spelled out
version: 2
policy: test-partners
description: "retailer and brand"
outputs: {retention_days: 365, uses: [audience_export, scoring]}
privacy:
  dp: {delta: 0.000001, epsilon_per_run: 2, budget: {window_days: 30, epsilon: 8}}
  secure_aggregation: required
identity: {methods: [psi]}
minimums: {cohort_size: 20, rows_per_party: 500}
residency: {coordinator_regions: [EU], data_regions: [EU]}
features: {forbidden: [jurisdiction, "*_id"], allowed: ["*"]}
partners:
  - {roles: [coordinator], region: EU, organisation: acme-retail, name: coordinator-eu}
  - {name: brand-eu, organisation: globex-brands, region: EU, roles: [participant]}
  - {name: retailer-eu, organisation: acme-retail, region: EU, roles: [label_holder, participant]}
consent:
  purposes:
    audience_modeling: {opt_out_signals: [gpc:sale_sharing], signals: [segment:Advertising]}
    model_training:
      tcf: {basis: consent, vendor_id: 1234, purposes: [10, 9, 7, 1]}
      signals: [segment:Analytics, rudderstack:C0002]     # order does not matter
  jurisdictions: {opt_out: [US], opt_in: [UK, EU]}
  unknown_jurisdiction: deny
purposes: {lawful_basis: consent, allowed: [audience_modeling, model_training]}
"""


def test_reformatting_does_not_change_the_content_hash():
    original, reformatted = load_policy(PARTNER_POLICY), load_policy(REFORMATTED)
    assert reformatted.content_hash == original.content_hash
    assert reformatted == original


def test_defaults_spelled_out_or_omitted_hash_the_same():
    omitted = PARTNER_POLICY.replace("      opt_out_signals: []\n", "", 1)
    assert omitted.count("opt_out_signals") == PARTNER_POLICY.count("opt_out_signals") - 1
    assert load_policy(omitted).content_hash == load_policy(PARTNER_POLICY).content_hash


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("version: 2", "version: 3"),
        ("epsilon: 8.0", "epsilon: 8.5"),
        ("rows_per_party: 500", "rows_per_party: 501"),
        ("unknown_jurisdiction: deny", "unknown_jurisdiction: allow"),
        ('forbidden: ["*_id", jurisdiction]', 'forbidden: ["*_id"]'),
        ("description: retailer and brand", "description: retailer and a brand"),
        ("vendor_id: 1234", "vendor_id: 1235"),
    ],
)
def test_any_change_of_value_changes_the_content_hash(old, new):
    assert old in PARTNER_POLICY
    changed = load_policy(PARTNER_POLICY.replace(old, new, 1))
    assert changed.content_hash != load_policy(PARTNER_POLICY).content_hash


def test_content_hash_is_sha256_of_the_canonical_json():
    policy = load_policy(PARTNER_POLICY)
    assert policy.content_hash == hashlib.sha256(policy.canonical_json.encode()).hexdigest()
    document = policy.to_dict()
    assert json.dumps(document, sort_keys=True, separators=(",", ":")) == policy.canonical_json
    assert document["privacy"]["dp"]["budget"] == {"epsilon": 8.0, "window_days": 30}


def test_loading_from_a_path_or_from_text_gives_the_same_policy(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PARTNER_POLICY)
    from_path, from_str, from_text = (
        load_policy(path),
        load_policy(str(path)),
        load_policy(PARTNER_POLICY),
    )
    assert from_path == from_str == from_text
    assert from_path.source == str(path) and from_text.source == "<text>"


def test_a_policy_is_frozen():
    policy = load_policy(PARTNER_POLICY)
    with pytest.raises(AttributeError):
        policy.name = "other"  # type: ignore[misc]
    assert hash(policy) == hash(load_policy(REFORMATTED))


# --- Built-in PII ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "column",
    [
        "email", "EMAIL", "Email_Address", "emailAddress", "customerEmail", "e-mail",
        "hashed_email", "email_sha256", "email2", "phone", "PhoneNumber", "mobile_phone",
        "phone_e164", "name", "first_name", "FirstName", "LAST_NAME", "full_name", "customer_name",
        "user_name", "username", "address", "billing_address", "address1", "street", "zip",
        "zip_code", "billing_zip_code", "postcode", "postal_code", "ip", "ip_address", "IPAddress",
        "ssn", "national_id", "date_of_birth", "dob", "latitude", "longitude", "lat", "lng",
        "device_id", "idfa", "Prénom_first_name", "mobile",
    ],
)  # fmt: skip
def test_pii_columns_are_recognised(column):
    assert pii_term(column) is not None


@pytest.mark.parametrize(
    "column",
    [
        "recency_days", "frequency", "monetary", "product_name", "campaign_name", "is_mobile",
        "mobile_sessions_30d", "page_views_30d", "orders_90d", "vip_tier", "tip_amount",
        "gzip_bytes", "zipper_clicks", "address_count", "purchased_30d",
        "latency_ms", "longest_session",
    ],
)  # fmt: skip
def test_behavioural_columns_are_not_pii(column):
    assert pii_term(column) is None


def test_pii_rule_is_documented_in_the_readme():
    readme = (POLICIES / "README.md").read_text()
    for word in (
        "Built-in PII",
        "Strong terms",
        "Whole-name terms",
        "Email_Address",
        "content_hash",
    ):
        assert word in readme
    for key in ("unknown_jurisdiction", "opt_out_signals", "coordinator_regions", "rows_per_party",
                "cohort_size", "secure_aggregation", "epsilon_per_run", "window_days",
                "retention_days", "lawful_basis", "vendor_id"):  # fmt: skip
        assert f"`{key}`" in readme or f"`dp.{key}`" in readme or f".{key}`" in readme, key


def test_every_schema_property_is_documented_in_the_readme():
    readme = (POLICIES / "README.md").read_text()

    def keys(node):
        if isinstance(node, dict):
            for name, sub in node.get("properties", {}).items():
                yield name
                yield from keys(sub)
            for sub in node.values():
                if isinstance(sub, dict | list):
                    yield from keys(sub)
        elif isinstance(node, list):
            for sub in node:
                yield from keys(sub)

    missing = sorted({k for k in keys(policy_schema()) if k not in readme})
    assert not missing
    assert Path(POLICIES / "README.md").exists()
