"""Shared fixtures: a fresh plugin manager per test, SQLite and PostgreSQL store URLs."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import settings

from cdp_federated.plugins import FIRST_PARTY_CONNECTORS, make_plugin_manager

PG_ENV = "CDP_FL_TEST_PG_URL"

# CI runs hypothesis derandomised and without deadlines (shared 2-core machine).
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def pm():
    """Built-ins plus first-party connectors; never whatever else is installed."""
    return make_plugin_manager(load_entrypoints=False, plugins=FIRST_PARTY_CONNECTORS)


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'cdp.sqlite'}"


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database per test (dropped afterwards)."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set: PostgreSQL tests need a server (.ci/run starts one)")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = "cdp_test_" + uuid.uuid4().hex[:12]
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """Run a test on both SQLite and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cdp.sqlite'}"
    return request.getfixturevalue("pg_url")
