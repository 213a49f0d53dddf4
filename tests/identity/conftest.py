"""Identity tests: product code must never touch ``random`` or ``numpy.random``.

ruff's banned-api rule refuses ``import random`` statically; this autouse fixture is the run-time
half. It replaces the module-level functions of ``random`` and ``numpy.random`` with wrappers that
fail the test when their *immediate caller* is a module of the ``cdp_federated`` package (by the
caller's ``__name__``, or its file when the name says nothing). Tests themselves, hypothesis and
third-party libraries keep working: a test may build its data with a seeded
``numpy.random.default_rng``. Classes (``random.Random``, ``numpy.random.Generator``...) are left
alone so that ``isinstance`` checks elsewhere keep working; creating a generator goes through
``default_rng`` or ``Generator`` methods on an instance the test made.
"""

from __future__ import annotations

import functools
import random  # noqa: TID251 - this fixture patches it to ban it
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cdp_federated

PRODUCT_DIR = Path(cdp_federated.__file__).resolve().parent

RANDOM_FUNCTIONS = (
    "random",
    "getrandbits",
    "randbytes",
    "randint",
    "randrange",
    "choice",
    "choices",
    "shuffle",
    "sample",
    "uniform",
    "gauss",
    "normalvariate",
    "seed",
)
NUMPY_RANDOM_FUNCTIONS = (
    "default_rng",
    "random",
    "random_sample",
    "rand",
    "randn",
    "randint",
    "bytes",
    "choice",
    "shuffle",
    "permutation",
    "normal",
    "uniform",
    "integers",
    "seed",
)


class BannedRandomnessError(BaseException):
    """Raised (as a BaseException, so an ``except Exception`` in product code cannot swallow it)
    when product code calls a banned randomness function."""


def is_product_frame(frame: Any) -> bool:
    name = frame.f_globals.get("__name__", "") or ""
    if name == "cdp_federated" or name.startswith("cdp_federated."):
        return True
    try:
        path = Path(frame.f_code.co_filename).resolve()
    except (OSError, ValueError):
        return False
    return path.is_relative_to(PRODUCT_DIR)


def _guard(qualname: str, fn: Any, violations: list[str]) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1)
        if is_product_frame(caller):
            where = f"{caller.f_globals.get('__name__')}:{caller.f_lineno}"
            violations.append(f"{qualname} called from {where}")
            raise BannedRandomnessError(
                f"{qualname} called from product code ({where}): use secrets/os.urandom"
            )
        return fn(*args, **kwargs)

    return wrapper


@pytest.fixture(autouse=True)
def ban_insecure_randomness(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Fail any test in which cdp_federated code calls random/numpy.random functions."""
    violations: list[str] = []
    for name in RANDOM_FUNCTIONS:
        if hasattr(random, name):
            monkeypatch.setattr(
                random, name, _guard(f"random.{name}", getattr(random, name), violations)
            )
    for name in NUMPY_RANDOM_FUNCTIONS:
        if hasattr(np.random, name):
            original = getattr(np.random, name)
            monkeypatch.setattr(
                np.random, name, _guard(f"numpy.random.{name}", original, violations)
            )
    yield violations
    if violations:
        pytest.fail("product code used banned randomness: " + "; ".join(violations))
