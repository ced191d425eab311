"""Fixtures of the feedback UI tests: people with roles, seeded conversations, a request stub."""

from __future__ import annotations

from pathlib import Path

import pytest
from ui_helpers import People, add_people

from agent.config import Settings
from agent.store.api import Store
from feedback_ui.auth import Access
from feedback_ui.common import UIContext


@pytest.fixture
def people(store: Store) -> People:
    return add_people(store)


@pytest.fixture
def ctx(store: Store, settings: Settings) -> UIContext:
    """A UI context with auth on and no chat model."""
    return UIContext(store=store, settings=settings, access=Access(store, auth=True))


@pytest.fixture
def deployed_tiny(sqlite_store: Store, sqlite_settings: Settings, tiny_model_dir: Path) -> int:
    """The tiny model registered as a base and deployed; returns its version id."""
    from agent.registry import ModelRegistry

    registry = ModelRegistry(sqlite_store, sqlite_settings)
    version_id = registry.add("base", tiny_model_dir, name="tiny")
    registry.deploy(version_id)
    return version_id


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """Keep each phase's report on the test item, so fixtures can tell a failure (screenshots)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
