"""Fixtures shared by the CRM and the ledger contract suites."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from connectors.sandboxkit import SandboxServer


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, SandboxServer]]:
    """One socket per vendor for the module; each test puts its own fresh sandbox behind it."""
    running: dict[str, SandboxServer] = {}
    try:
        yield running
    finally:
        for server in running.values():
            server.stop()
