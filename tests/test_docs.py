"""Docs are tested: every hook's exact signature, every setting and every result key is documented."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from cdp_federated import hookspecs
from cdp_federated.results import RESULT_FIELDS
from cdp_federated.settings import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
HOOK_DOCS = (ROOT / "docs" / "plugins.md").read_text()
README = (ROOT / "README.md").read_text()
HOOKS = [
    f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("cdp_")
]


def signature_text(fn) -> str:
    sig = inspect.signature(fn)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{fn.__name__}({params}) -> {sig.return_annotation}"


@pytest.mark.parametrize("hook", HOOKS, ids=lambda f: f.__name__)
def test_every_hook_is_documented_with_its_exact_signature(hook):
    assert f"### `{signature_text(hook)}`" in HOOK_DOCS


@pytest.mark.parametrize("hook", HOOKS, ids=lambda f: f.__name__)
def test_every_hook_has_a_docstring_saying_how_results_combine(hook):
    doc = inspect.getdoc(hook) or ""
    assert "Called" in doc or "called" in doc
    assert any(
        word in doc
        for word in ("Every implementation", "First non-", "flattened", "ANDed", "any vote")
    )


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_every_setting_is_in_the_readme(setting):
    assert f"`{setting.env}`" in README


@pytest.mark.parametrize("key", sorted(RESULT_FIELDS))
def test_every_result_key_is_in_the_readme(key):
    assert f"`{key}`" in README


def test_readme_opens_with_the_two_command_quick_start():
    head = README[:1500]
    assert "make demo" in head and "make test" in head
