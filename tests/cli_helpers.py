"""Running ``cdp-fl`` in-process from tests."""

from __future__ import annotations

import sys

from cdp_federated import cli


def run(monkeypatch, capsys, *args):
    """``cdp-fl ARGS`` through the real entry point; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["cdp-fl", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
