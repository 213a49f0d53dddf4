"""Plugin manager: built-in plugins, entry-point plugins, pending-hook check and call tracing.

Built-in features are registered exactly as third-party plugins are. First-party connectors live
in the top-level ``connectors`` package and arrive through the ``cdp_federated`` entry-point group,
like any other installed plugin.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterable
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .settings import get_setting

__all__ = ["DEFAULT_PLUGINS", "FIRST_PARTY_CONNECTORS", "make_plugin_manager", "plugin_names"]

log = logging.getLogger("cdp_federated.hooks")

DEFAULT_PLUGINS: tuple[str, ...] = (
    "cdp_federated.ingest",
    "cdp_federated.scoring",
)

# The modules our own pyproject registers under the entry-point group. Tests (which never load
# whatever happens to be installed) register these explicitly.
FIRST_PARTY_CONNECTORS: tuple[str, ...] = (
    "connectors.files",
    "connectors.sql",
    "connectors.segment",
    "connectors.frames",
)


def make_plugin_manager(
    *,
    load_entrypoints: bool = True,
    plugins: Iterable[Any] = (),
    trace: bool | None = None,
) -> pluggy.PluginManager:
    """Build a fresh plugin manager.

    ``load_entrypoints=False`` skips installed plugins (tests pass the plugins they need through
    ``plugins``, module objects or dotted module names). ``trace`` logs every hook call with its
    duration at INFO on the ``cdp_federated.hooks`` logger (default: the ``trace_hooks`` setting).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entrypoints:
        try:
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        except Exception as exc:  # noqa: BLE001 - name the broken plugin instead of a traceback
            raise PluginError(
                f"an installed plugin failed to load: {exc!r}",
                field="entry point group",
                value=hookspecs.PROJECT,
                fix="fix or uninstall the plugin named above (pip list, pip uninstall)",
            ) from exc
    for plugin in plugins:
        obj = importlib.import_module(plugin) if isinstance(plugin, str) else plugin
        if pm.is_registered(obj):
            continue
        name = plugin if isinstance(plugin, str) else None
        pm.register(obj, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"a plugin implements a hook that does not exist: {exc}",
            fix="check the hook name against cdp_federated.hookspecs (names start with cdp_)",
        ) from exc
    if trace if trace is not None else get_setting("trace_hooks"):
        _enable_tracing(pm)
    return pm


def _enable_tracing(pm: pluggy.PluginManager) -> None:
    started: list[float] = []

    def before(hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
        started.append(time.perf_counter())
        arg_types = {k: type(v).__name__ for k, v in kwargs.items()}
        log.info("call %s(%s) -> %d impls", hook_name, arg_types, len(impls))

    def after(outcome: Any, hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - started.pop() if started else 0.0
        log.info("done %s in %.3f ms", hook_name, elapsed * 1000)

    pm.add_hookcall_monitoring(before, after)


def plugin_names(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Each registered plugin with the hooks it implements (for ``cdp-fl plugins``)."""
    out = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or repr(plugin)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        out.append({"name": name, "hooks": hooks})
    return sorted(out, key=lambda d: d["name"])
