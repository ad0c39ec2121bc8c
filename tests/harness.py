"""Test harness: vendor sandboxes as separate processes, configs pointing at them, CLI runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()

XERO_CLIENT_ID = "demo-client"
XERO_TENANT = "demo-tenant"

TAX_MAP = {"20": "TAX001", "10": "TAX002", "5.5": "TAX003", "2.1": "TAX004"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sync.cli", *args]


@dataclass
class SandboxProc:
    vendor: str
    url: str
    proc: subprocess.Popen[str]

    def get(self, path: str) -> Any:
        return httpx.get(self.url + path, timeout=30).json()

    def post(self, path: str, body: Any = None) -> Any:
        return httpx.post(self.url + path, json=body, timeout=30).json()

    def put(self, path: str, body: Any = None) -> Any:
        return httpx.put(self.url + path, json=body, timeout=30).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextmanager
def sandbox_process(vendor: str, *args: str) -> Iterator[SandboxProc]:
    """Start ``ledgerbridge sandbox serve VENDOR`` on a free port; yields once it prints its URL."""
    proc = subprocess.Popen(cli("sandbox", "serve", vendor, "--port", "0", *args), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("http://"):
        proc.kill()
        raise RuntimeError(f"{vendor} sandbox did not start: {line!r}")
    sp = SandboxProc(vendor, line, proc)
    try:
        yield sp
    finally:
        sp.stop()


def crm_block(vendor: str, url: str, time_scale: float = 1.0) -> str:
    """The YAML ``crm:`` block body that points ``vendor``'s connector at its sandbox at ``url``."""
    from sync.sandboxes import crm_sandbox_settings

    settings = crm_sandbox_settings(vendor, url, time_scale=time_scale)
    return "".join(f"      {k}: {json.dumps(v)}\n" for k, v in settings.items())


def hubspot_block(url: str, time_scale: float = 1.0) -> str:
    return f"""\
      type: hubspot
      base_url: {url}
      access_token: ${{HUBSPOT_TOKEN:-demo-hubspot-token}}
      time_scale: {time_scale}
"""


def ledger_block(vendor: str, url: str, refresh_token: str | None, time_scale: float = 1.0) -> str:
    """The YAML ``ledger:`` block body for ``vendor``'s sandbox at ``url``, with the seeded tax types."""
    from sync.sandboxes import ledger_sandbox_settings

    settings = ledger_sandbox_settings(vendor, url, refresh_token=refresh_token, time_scale=time_scale)
    settings["tax_types"] = LEDGER_TAX_TYPES[vendor]
    return "".join(f"      {k}: {json.dumps(v)}\n" for k, v in settings.items())


LEDGER_TAX_TYPES: dict[str, dict[str, str]] = {
    "xero": {"20": "TAX001", "10": "TAX002", "5.5": "TAX003", "2.1": "TAX004"},
    "quickbooks": {"20": "2", "10": "3", "5.5": "4", "2.1": "5"},
    "pennylane": {"20": "FR_200", "10": "FR_100", "5.5": "FR_55", "2.1": "FR_21"},
}


def write_config(path: Path, *, refresh_token: str | None, state_url: str, xero_url: str = "",
                 hubspot_url: str = "", time_scale: float = 1.0, pipeline: str = "main", extra: str = "",
                 log_level: str = "info", crm_block: str | None = None, ledger: str | None = None,
                 ledger_url: str = "") -> Path:
    """A one-pipeline config: HubSpot at ``hubspot_url`` unless ``crm_block`` gives another CRM, and Xero
    at ``xero_url`` unless ``ledger`` names another ledger sandbox at ``ledger_url``."""
    taxes = "\n".join(f'        "{k}": {v}' for k, v in TAX_MAP.items())
    from connectors.seedbook import PRODUCTS

    items = "\n".join(f'        {p.sku}: {{item_code: {p.sku}, account_code: "706"}}' for p in PRODUCTS)
    crm = crm_block if crm_block is not None else hubspot_block(hubspot_url, time_scale)
    if ledger is None or ledger == "xero":
        ledger_text = f"""\
      type: xero
      base_url: {xero_url or ledger_url}
      token_url: {xero_url or ledger_url}/connect/token
      tenant_id: {XERO_TENANT}
      client_id: {XERO_CLIENT_ID}
      client_secret: ${{XERO_CLIENT_SECRET:-demo-client-secret}}
      refresh_token: {refresh_token}
      time_scale: {time_scale}
"""
    else:
        ledger_text = ledger_block(ledger, ledger_url, refresh_token, time_scale)
    path.write_text(f"""\
state:
  url: {state_url}
logging:
  level: {log_level}
  format: json
pipelines:
  {pipeline}:
    crm:
{crm.rstrip()}
    ledger:
{ledger_text.rstrip()}
    items:
      on_unmapped: default
      default:
        account_code: "706"
      map:
{items}
    taxes:
      map:
{taxes}
{extra}""")
    return path


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=full_env,
                          check=False)


def wait_until(pred: Any, timeout: float = 30.0, interval: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return False


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)[:4000]
