"""Find connector classes by name.

Connectors are published as entry points in two groups, ``ledgerbridge.crm`` (a :class:`CrmSource`) and
``ledgerbridge.ledger`` (a :class:`Ledger`). An entry point is imported only when its name is asked for
(or when :func:`available` lists what can be used), so a broken third-party package never stops the
others: its import error becomes a structlog warning and the connector is treated as unavailable.

:func:`register` and :func:`registered` add connectors in-process, for tests and for programs that embed
LedgerBridge. Such registrations take precedence over entry points of the same name.

Every connector class carries ``Settings: ClassVar[type[ConnectorSettings]]``, the pydantic model that
validates its ``crm:`` or ``ledger:`` block; :func:`settings_model` returns it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import EntryPoint, entry_points
from typing import Literal, cast, overload

import structlog

from config.schema import ConnectorSettings
from connectors.errors import ConfigError, redact
from connectors.interfaces import CrmSource, Ledger

__all__ = [
    "ENTRY_POINT_GROUPS",
    "ConnectorClass",
    "Kind",
    "UnknownConnectorError",
    "available",
    "connector_class",
    "register",
    "registered",
    "settings_model",
]

log = structlog.get_logger("ledgerbridge.registry")

Kind = Literal["crm", "ledger"]
ConnectorClass = type[CrmSource] | type[Ledger]

ENTRY_POINT_GROUPS: dict[Kind, str] = {"crm": "ledgerbridge.crm", "ledger": "ledgerbridge.ledger"}
_BASES: dict[Kind, type[CrmSource] | type[Ledger]] = {"crm": CrmSource, "ledger": Ledger}


class UnknownConnectorError(ConfigError):
    """No usable connector has this name: none is registered, or its plug-in failed to load."""

    def __init__(self, kind: Kind, name: str, available: Sequence[str], load_error: str | None = None) -> None:
        self.kind = kind
        self.name = name
        self.available = list(available)
        self.load_error = load_error
        names = ", ".join(self.available) or "none"
        if load_error is None:
            message = f"no {kind} connector named {name!r}; available: {names}"
        else:
            message = f"the {kind} connector {name!r} failed to load ({load_error}); available: {names}"
        super().__init__(message)


_lock = threading.RLock()
_overrides: dict[tuple[Kind, str], ConnectorClass] = {}
# Outcome of loading one entry point, keyed by (kind, name, "module:attr"): the class or the error text.
_loaded: dict[tuple[Kind, str, str], ConnectorClass | str] = {}


def _check_kind(kind: str) -> Kind:
    if kind not in ENTRY_POINT_GROUPS:
        raise ValueError(f"connector kind must be 'crm' or 'ledger', not {kind!r}")
    return kind


def _class_problem(kind: Kind, obj: object) -> str | None:
    """Why ``obj`` cannot serve as a ``kind`` connector, or None when it can."""
    base = _BASES[kind]
    if not isinstance(obj, type) or not issubclass(obj, base):
        what = obj.__name__ if isinstance(obj, type) else f"a {type(obj).__name__} object"
        return f"expected a subclass of {base.__name__}, got {what}"
    settings = getattr(obj, "Settings", None)
    if not isinstance(settings, type) or not issubclass(settings, ConnectorSettings):
        return f"{obj.__name__}.Settings must be a subclass of ConnectorSettings"
    return None


def settings_model(cls: ConnectorClass) -> type[ConnectorSettings]:
    """The settings model of a connector class (its ``Settings`` class attribute)."""
    settings = getattr(cls, "Settings", None)
    if not isinstance(settings, type) or not issubclass(settings, ConnectorSettings):
        raise TypeError(f"{cls.__name__}.Settings must be a subclass of ConnectorSettings")
    return settings


def _entry_points(kind: Kind) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUPS[kind]):
        found.setdefault(ep.name, ep)  # the first on sys.path wins, as for imports
    return found


def _load(kind: Kind, ep: EntryPoint) -> ConnectorClass | str:
    """Import one entry point once; a failure is logged as a warning and remembered as its message."""
    key = (kind, ep.name, ep.value)
    with _lock:
        if key in _loaded:
            return _loaded[key]
        outcome: ConnectorClass | str
        error_type: str
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plug-in must not break the other connectors
            error_type, error = type(exc).__name__, redact(str(exc))
            outcome = f"{error_type}: {error}"
        else:
            problem = _class_problem(kind, obj)
            if problem is None:
                outcome = cast(ConnectorClass, obj)
            else:
                error_type, error = "TypeError", problem
                outcome = f"{error_type}: {error}"
        if isinstance(outcome, str):
            log.warning(
                "connector_unavailable",
                kind=kind,
                connector=ep.name,
                target=ep.value,
                error_type=error_type,
                error=error,
            )
        _loaded[key] = outcome
        return outcome


def available(kind: Kind) -> list[str]:
    """Names of the usable ``kind`` connectors, sorted. Imports every entry point of the group."""
    kind = _check_kind(kind)
    with _lock:
        names = {name for (k, name) in _overrides if k == kind}
    for name, ep in _entry_points(kind).items():
        if name not in names and not isinstance(_load(kind, ep), str):
            names.add(name)
    return sorted(names)


@overload
def connector_class(kind: Literal["crm"], name: str) -> type[CrmSource]: ...
@overload
def connector_class(kind: Literal["ledger"], name: str) -> type[Ledger]: ...
@overload
def connector_class(kind: Kind, name: str) -> ConnectorClass: ...
def connector_class(kind: Kind, name: str) -> ConnectorClass:
    """The connector class registered as ``name``.

    Raises :class:`UnknownConnectorError` (a :class:`~connectors.errors.ConfigError`) listing the
    available names when there is no such connector or its plug-in failed to load.
    """
    kind = _check_kind(kind)
    with _lock:
        override = _overrides.get((kind, name))
    if override is not None:
        return override
    ep = _entry_points(kind).get(name)
    if ep is None:
        raise UnknownConnectorError(kind, name, available(kind))
    outcome = _load(kind, ep)
    if isinstance(outcome, str):
        raise UnknownConnectorError(kind, name, available(kind), load_error=outcome)
    return outcome


def register(kind: Kind, name: str, cls: ConnectorClass) -> None:
    """Make ``cls`` the ``kind`` connector called ``name``, ahead of any entry point of that name."""
    kind = _check_kind(kind)
    if not name or not isinstance(name, str):
        raise ValueError("a connector name must be a non-empty string")
    problem = _class_problem(kind, cls)
    if problem is not None:
        raise TypeError(f"cannot register {name!r} as a {kind} connector: {problem}")
    with _lock:
        _overrides[(kind, name)] = cls


@contextmanager
def registered(kind: Kind, name: str, cls: ConnectorClass) -> Iterator[ConnectorClass]:
    """Register ``cls`` for the duration of a ``with`` block, then restore what was there before."""
    kind = _check_kind(kind)
    with _lock:
        previous = _overrides.get((kind, name))
    register(kind, name, cls)
    try:
        yield cls
    finally:
        with _lock:
            if previous is None:
                _overrides.pop((kind, name), None)
            else:
                _overrides[(kind, name)] = previous
