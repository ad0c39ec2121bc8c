"""`ledgerbridge validate`: problems on stderr as FILE:LINE:COL lines with exit code 2, exit 0 when valid."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("sync.cli")

REPO = Path(__file__).resolve().parents[2]

# A connector package that is installed only for the child process: a module plus a .dist-info
# directory declaring its entry points, put on the child's PYTHONPATH.
PLUGIN = """
from __future__ import annotations
from typing import ClassVar, Literal
from pydantic import SecretStr
from config.schema import ConnectorSettings
from connectors.interfaces import CrmSource, Ledger

class CliCrmSettings(ConnectorSettings):
    type: Literal["clicrm"]
    token: SecretStr
    account: str

class CliCrm(CrmSource):
    vendor: ClassVar[str] = "clicrm"
    Settings: ClassVar[type[ConnectorSettings]] = CliCrmSettings

class CliLedgerSettings(ConnectorSettings):
    type: Literal["clildg"]
    api_key: SecretStr

class CliLedger(Ledger):
    vendor: ClassVar[str] = "clildg"
    Settings: ClassVar[type[ConnectorSettings]] = CliLedgerSettings
"""


def validate(path: Path, plugin_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if plugin_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin_dir), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "sync.cli", "validate", "-c", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unknown_top_level_key_exits_2_with_its_place(tmp_path: Path) -> None:
    """An unknown key is printed to stderr as FILE:LINE:COL: key: message, with exit code 2 and no traceback."""
    path = tmp_path / "ledgerbridge.yaml"
    path.write_text(
        textwrap.dedent("""\
            pipelines:
              main:
                crm: {type: hubspot}
                ledger: {type: xero}
            schedule_every: 5m
            """)
    )
    done = validate(path)
    assert done.returncode == 2, done.stderr
    assert f"{path}:5:1: schedule_every: unknown key" in done.stderr.splitlines()
    assert "Traceback" not in done.stderr


def test_bad_indentation_exits_2_with_its_place(tmp_path: Path) -> None:
    """A YAML syntax error is printed as FILE:LINE:COL with exit code 2 and no traceback."""
    path = tmp_path / "ledgerbridge.yaml"
    path.write_text("pipelines:\n  main:\n    crm:\n      type: hubspot\n     ledger: {type: xero}\n")
    done = validate(path)
    assert done.returncode == 2, done.stderr
    assert any(line.startswith(f"{path}:5:6: bad indentation") for line in done.stderr.splitlines()), done.stderr
    assert "Traceback" not in done.stderr


def test_valid_file_exits_0(tmp_path: Path) -> None:
    """A valid file, with connectors found through installed entry points, passes with exit code 0."""
    plugins = tmp_path / "site"
    plugins.mkdir()
    (plugins / "lbcli_plugin.py").write_text(PLUGIN)
    info = plugins / "lbcli_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lbcli-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[ledgerbridge.crm]\nclicrm = lbcli_plugin:CliCrm\n[ledgerbridge.ledger]\nclildg = lbcli_plugin:CliLedger\n"
    )
    (tmp_path / "token").write_text("secret-token\n")
    path = tmp_path / "ledgerbridge.yaml"
    path.write_text(
        textwrap.dedent("""\
            pipelines:
              main:
                crm:
                  type: clicrm
                  token_file: token
                  account: acme
                ledger:
                  type: clildg
                  api_key: ${LEDGER_KEY:-dev-key}
            """)
    )
    done = validate(path, plugin_dir=plugins)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
