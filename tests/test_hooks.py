"""The plugin contract: a fixture plugin implements every hook; results combine as documented."""

from __future__ import annotations

import inspect
import logging

import pluggy
import pytest

from cdp_federated import hookimpl, hookspecs
from cdp_federated.connector import ConnectorRegistry
from cdp_federated.errors import PluginError, PolicyViolation
from cdp_federated.jobs import JobSpec
from cdp_federated.participant.pipeline import check_policy
from cdp_federated.plugins import DEFAULT_PLUGINS, make_plugin_manager, plugin_names
from tests.plugins.every_hook import ConstantConnector, EveryHook

HOOK_NAMES = sorted(
    n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("cdp_")
)
JOB = JobSpec(
    job_id="j1",
    kind="horizontal",
    model="logreg",
    purpose="model_training",
    features=("x",),
    label="y",
)


def test_fixture_plugin_implements_every_hook(pm):
    fixture = EveryHook()
    pm.register(fixture, name="fixture")
    implemented = sorted(h.name for h in pm.get_hookcallers(fixture))
    assert implemented == HOOK_NAMES


def test_built_ins_are_registered_like_any_plugin(pm):
    names = {p["name"] for p in plugin_names(pm)}
    assert set(DEFAULT_PLUGINS) <= names
    assert "connectors.sql" in names and "connectors.segment" in names


def test_a_misspelt_hook_fails_loudly():
    class Typo:
        @hookimpl
        def cdp_proces_events(self, batch):  # missing 's'
            pass

    with pytest.raises(PluginError) as info:
        make_plugin_manager(load_entrypoints=False, plugins=[Typo()])
    assert "cdp_proces_events" in str(info.value)


def test_connectors_from_plugins_are_collected_and_clashes_rejected(pm):
    pm.register(EveryHook())
    registry = ConnectorRegistry(pm)
    assert "constant" in registry.types and "csv" in registry.types
    frame = registry.open({"type": "constant", "name": "c", "label": "y"}).scan().collect()
    assert frame.columns == ["profile_id", "x", "y"]

    class Clash(ConstantConnector):
        pass

    class ClashPlugin:
        @hookimpl
        def cdp_register_connectors(self):
            return [Clash]

    pm.register(ClashPlugin())
    with pytest.raises(PluginError) as info:
        ConnectorRegistry(pm)
    assert "constant" in str(info.value)


def test_policy_votes_any_deny_wins(pm):
    allow_all = type(
        "AllowAll", (), {"cdp_policy_decision": hookimpl(lambda self, job, participant: None)}
    )()
    pm.register(allow_all)
    check_policy(pm, JOB, "eu")  # only abstentions: allowed
    pm.register(EveryHook(deny_jobs=True))
    with pytest.raises(PolicyViolation) as info:
        check_policy(pm, JOB, "eu")
    assert info.value.reasons == ("fixture.deny: fixture denies every job",)
    assert "eu" in str(info.value)


def test_score_profile_is_first_result(pm, sqlite_url):
    from cdp_federated.store import open_store

    pm.register(EveryHook())
    store = open_store(sqlite_url, create=True)
    hit = pm.hook.cdp_score_profile(
        profile_id="fixture-vip", store=store, model_id=None, purpose="personalization"
    )
    assert hit == {"profile_id": "fixture-vip", "model_id": "fixture", "score": 1.0}
    miss = pm.hook.cdp_score_profile(
        profile_id="nobody", store=store, model_id=None, purpose="personalization"
    )
    assert miss is None  # no model published: the built-in scorer abstains too


def test_tracing_logs_each_hook_call(caplog):
    pm = make_plugin_manager(load_entrypoints=False, plugins=[EveryHook()], trace=True)
    with caplog.at_level(logging.INFO, logger="cdp_federated.hooks"):
        pm.hook.cdp_round_ended(job=JOB, round_number=1, metrics={})
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("call cdp_round_ended") for m in messages)
    assert any(m.startswith("done cdp_round_ended") for m in messages)


def test_cli_commands_from_plugins(pm):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()

    @app.command()
    def base() -> None:
        """A command that is always there."""

    pm.register(EveryHook())
    pm.hook.cdp_register_cli_commands(app=app)
    out = CliRunner().invoke(app, ["fixture-hello"])
    assert out.exit_code == 0 and "hello from the fixture plugin" in out.output


def test_entry_point_plugins_are_loaded(monkeypatch):
    loaded = []

    def fake_load(self, group, name=None):
        loaded.append(group)
        return 0

    monkeypatch.setattr(pluggy.PluginManager, "load_setuptools_entrypoints", fake_load)
    make_plugin_manager(load_entrypoints=True)
    assert loaded == ["cdp_federated"]
