"""Small stand-ins used by the Xero tests and the sandbox tooling: a token store and a hand-driven clock."""

from __future__ import annotations

import copy
import threading
from typing import Any

from connectors.interfaces import TokenStore
from connectors.sandboxkit import Clock

__all__ = ["ManualClock", "MemoryTokenStore"]


class MemoryTokenStore(TokenStore):
    """A :class:`TokenStore` in memory (one process; nothing survives a restart)."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.saves = 0

    def load(self, connection: str) -> dict[str, Any] | None:
        with self._lock:
            token = self._data.get(connection)
            return copy.deepcopy(token) if token is not None else None

    def save(self, connection: str, token: dict[str, Any]) -> None:
        with self._lock:
            self._data[connection] = copy.deepcopy(token)
            self.saves += 1


class ManualClock(Clock):
    """A sandbox clock that moves only when told to (``advance``); ``scale`` still converts waits."""

    def __init__(self, start: float = 1_767_225_600.0, scale: float = 1.0) -> None:  # 2026-01-01T00:00Z
        super().__init__(scale=scale, start=start)
        self._t = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._t

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._t += seconds
