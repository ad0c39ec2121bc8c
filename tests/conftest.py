"""Fixtures for every test."""

from __future__ import annotations

import compileall
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.http import forget_idle_budgets

_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Compile the project's modules once, before the workers start: many tests start `ledgerbridge` processes
    (crash tests, daemons, sandboxes), and where the environment forbids the interpreter to write bytecode
    (PYTHONDONTWRITEBYTECODE) each of them would compile every module again, about 0.6 s a process."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has done it
        return
    for package in ("config", "connectors", "metrics", "sync"):
        compileall.compile_dir(_ROOT / package, quiet=1)


@pytest.fixture(autouse=True)
def _fresh_rate_budgets() -> Iterator[None]:
    """Each test starts with no leftover rate budget: sandboxes are rebuilt behind reused addresses, and a
    budget that outlived an earlier test's connectors would count that test's calls against a new account."""
    forget_idle_budgets()
    yield
    forget_idle_budgets()
