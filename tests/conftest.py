"""Fixtures for every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from connectors.http import forget_idle_budgets


@pytest.fixture(autouse=True)
def _fresh_rate_budgets() -> Iterator[None]:
    """Each test starts with no leftover rate budget: sandboxes are rebuilt behind reused addresses, and a
    budget that outlived an earlier test's connectors would count that test's calls against a new account."""
    forget_idle_budgets()
    yield
    forget_idle_budgets()
