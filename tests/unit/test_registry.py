"""The connector registry: entry-point discovery, lazy loading, broken plug-ins and in-process overrides."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from config.schema import ConnectorSettings
from connectors import registry
from connectors.errors import ConfigError
from connectors.interfaces import CrmSource, Ledger
from connectors.registry import (
    UnknownConnectorError,
    available,
    connector_class,
    register,
    registered,
    settings_model,
)

REPO = Path(__file__).resolve().parents[2]


class FakeCrmSettings(ConnectorSettings):
    type: Literal["fakecrm"]
    token: SecretStr
    account: str


class FakeCrm(CrmSource):
    vendor: ClassVar[str] = "fakecrm"
    Settings: ClassVar[type[ConnectorSettings]] = FakeCrmSettings


class OtherCrm(CrmSource):
    vendor: ClassVar[str] = "fakecrm"
    Settings: ClassVar[type[ConnectorSettings]] = FakeCrmSettings


class FakeLedgerSettings(ConnectorSettings):
    type: Literal["fakeledger"]


class FakeLedger(Ledger):
    vendor: ClassVar[str] = "fakeledger"
    Settings: ClassVar[type[ConnectorSettings]] = FakeLedgerSettings


class NoSettingsCrm(CrmSource):
    vendor: ClassVar[str] = "nosettings"


GOOD_PLUGIN = """
from __future__ import annotations
from typing import ClassVar, Literal
from config.schema import ConnectorSettings
from connectors.interfaces import CrmSource

class PluginSettings(ConnectorSettings):
    type: Literal["{name}"]
    region: str = "eu"

class PluginCrm(CrmSource):
    vendor: ClassVar[str] = "{name}"
    Settings: ClassVar[type[ConnectorSettings]] = PluginSettings
"""


@dataclass
class Plugins:
    """Names of the entry points an installed test distribution provides."""

    good: str
    broken: str
    not_a_connector: str
    good_module: str
    broken_module: str


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Plugins]:
    """A distribution on sys.path (a .dist-info directory) with a good, a broken and a wrong plug-in."""
    uid = uuid.uuid4().hex[:8]
    p = Plugins(
        good=f"good{uid}",
        broken=f"broken{uid}",
        not_a_connector=f"wrong{uid}",
        good_module=f"lbplug_good_{uid}",
        broken_module=f"lbplug_broken_{uid}",
    )
    (tmp_path / f"{p.good_module}.py").write_text(GOOD_PLUGIN.replace("{name}", p.good))
    (tmp_path / f"{p.broken_module}.py").write_text("import lbplug_dependency_that_is_not_installed\n")
    info = tmp_path / f"lbplug_{uid}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lbplug-{uid}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(f"""\
            [ledgerbridge.crm]
            {p.good} = {p.good_module}:PluginCrm
            {p.broken} = {p.broken_module}:Whatever
            {p.not_a_connector} = {p.good_module}:PluginSettings
            """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield p
    for module in (p.good_module, p.broken_module):
        sys.modules.pop(module, None)


def test_registered_connector_is_found_by_name() -> None:
    """A class registered in-process is returned for its kind and name, with its settings model."""
    with registered("crm", "fakecrm", FakeCrm):
        assert connector_class("crm", "fakecrm") is FakeCrm
        assert settings_model(connector_class("crm", "fakecrm")) is FakeCrmSettings
        assert "fakecrm" in available("crm")
        assert "fakecrm" not in available("ledger")


def test_registration_ends_with_the_context() -> None:
    """Leaving registered() removes the connector again, and asking for it lists what is available."""
    with registered("ledger", "fakeledger", FakeLedger):
        pass
    with pytest.raises(UnknownConnectorError) as info:
        connector_class("ledger", "fakeledger")
    assert isinstance(info.value, ConfigError)
    assert "no ledger connector named 'fakeledger'; available: " in str(info.value)
    assert info.value.available == available("ledger")


def test_unknown_name_lists_the_available_ones() -> None:
    """An unknown name raises a ConfigError whose message names every usable connector of that kind."""
    with registered("crm", "fakecrm", FakeCrm):
        names = ", ".join(available("crm"))
        with pytest.raises(ConfigError) as info:
            connector_class("crm", "nosuchcrm")
    assert str(info.value) == f"no crm connector named 'nosuchcrm'; available: {names}"
    assert "fakecrm" in names


def test_registered_restores_the_previous_override() -> None:
    """Nested registrations of one name restore the outer class when the inner block ends."""
    with registered("crm", "fakecrm", FakeCrm):
        with registered("crm", "fakecrm", OtherCrm):
            assert connector_class("crm", "fakecrm") is OtherCrm
        assert connector_class("crm", "fakecrm") is FakeCrm


def test_register_rejects_what_is_not_a_connector() -> None:
    """register() refuses a ledger as a CRM, a class without Settings, and an unknown kind."""
    with pytest.raises(TypeError, match="subclass of CrmSource"):
        register("crm", "x", FakeLedger)
    with pytest.raises(TypeError, match="Settings must be a subclass of ConnectorSettings"):
        register("crm", "x", NoSettingsCrm)
    with pytest.raises(ValueError, match="'crm' or 'ledger'"):
        register("erp", "x", FakeCrm)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        register("crm", "", FakeCrm)


def test_entry_point_is_imported_only_when_asked_for(plugins: Plugins) -> None:
    """An installed plug-in module is not imported until its name is looked up, then its class is used."""
    assert plugins.good_module not in sys.modules
    cls = connector_class("crm", plugins.good)
    assert plugins.good_module in sys.modules
    assert cls.__name__ == "PluginCrm"
    assert issubclass(cls, CrmSource)
    assert settings_model(cls).model_validate({"type": plugins.good}).region == "eu"  # type: ignore[attr-defined]


def test_broken_plugin_is_a_warning_and_unavailable(plugins: Plugins) -> None:
    """A plug-in that fails to import is logged as a warning with its error and left out; others load."""
    with capture_logs() as logs:
        names = available("crm")
    assert plugins.good in names
    assert plugins.broken not in names
    assert plugins.not_a_connector not in names
    warnings = {entry["connector"]: entry for entry in logs if entry["event"] == "connector_unavailable"}
    broken = warnings[plugins.broken]
    assert broken["log_level"] == "warning"
    assert broken["error_type"] == "ModuleNotFoundError"
    assert "lbplug_dependency_that_is_not_installed" in broken["error"]
    assert warnings[plugins.not_a_connector]["error_type"] == "TypeError"
    assert "expected a subclass of CrmSource" in warnings[plugins.not_a_connector]["error"]


def test_broken_plugin_lookup_explains_the_failure(plugins: Plugins) -> None:
    """Asking for a broken plug-in by name raises a ConfigError that carries its import error."""
    with capture_logs(), pytest.raises(UnknownConnectorError) as info:
        connector_class("crm", plugins.broken)
    assert info.value.load_error is not None
    assert info.value.load_error.startswith("ModuleNotFoundError: ")
    assert f"the crm connector '{plugins.broken}' failed to load (ModuleNotFoundError" in str(info.value)


def test_broken_plugin_warns_once(plugins: Plugins) -> None:
    """The failure of one plug-in is logged once, however often the registry is asked."""
    with capture_logs() as logs:
        available("crm")
        available("crm")
        with pytest.raises(UnknownConnectorError):
            connector_class("crm", plugins.broken)
    assert [e["connector"] for e in logs if e["event"] == "connector_unavailable"].count(plugins.broken) == 1


def test_override_takes_precedence_over_entry_point(plugins: Plugins) -> None:
    """A registered class wins over an installed entry point of the same name."""
    with registered("crm", plugins.good, FakeCrm):
        assert connector_class("crm", plugins.good) is FakeCrm
    assert connector_class("crm", plugins.good) is not FakeCrm


def test_available_is_sorted_and_per_kind(plugins: Plugins) -> None:
    """available() lists each kind's usable names in order, overrides and entry points together."""
    with capture_logs(), registered("crm", "aaa-first", FakeCrm), registered("ledger", "fakeledger", FakeLedger):
        crm = available("crm")
        assert crm == sorted(crm)
        assert {"aaa-first", plugins.good} <= set(crm)
        assert "fakeledger" in available("ledger")
        assert plugins.good not in available("ledger")


def test_entry_point_groups_are_the_documented_ones() -> None:
    """The registry reads the ledgerbridge.crm and ledgerbridge.ledger entry-point groups."""
    assert registry.ENTRY_POINT_GROUPS == {"crm": "ledgerbridge.crm", "ledger": "ledgerbridge.ledger"}


@pytest.mark.parametrize("module", ["connectors.registry", "config", "config.loader", "config.schema"])
def test_modules_import_first_in_a_fresh_interpreter(module: str) -> None:
    """The registry and the config package import cleanly whichever of them is imported first."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
