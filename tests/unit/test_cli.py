"""`ledgerbridge plan`, `run` and `status` as a user runs them, against sandboxes served on sockets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connectors.hubspot.sandbox import HubSpotSandbox
from connectors.sandboxkit import SandboxServer, serve
from connectors.seedbook import generate_book
from connectors.xero.sandbox import XeroSandbox
from tests.harness import run_cli, write_config

SEED = 5


@dataclass
class Cli:
    hs: HubSpotSandbox
    xero: XeroSandbox
    config: Path
    won: int
    usd_won: int

    def __call__(self, *args: str, config: Path | None = None) -> tuple[int, Any, str]:
        """Run ``ledgerbridge ARGS -c CONFIG``; returns the exit code, the parsed JSON (if any), stderr."""
        proc = run_cli(*args, "-c", str(config or self.config), timeout=120)
        data = json.loads(proc.stdout) if "--json" in args and proc.stdout.strip() else None
        return proc.returncode, data, proc.stderr

    def config_with(self, name: str, extra: str) -> Path:
        text = self.config.read_text() + extra
        path = self.config.with_name(name)
        path.write_text(text)
        return path


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[SandboxServer, SandboxServer]]:
    """One HubSpot and one Xero socket for the module; each test puts its own fresh sandboxes behind them."""
    hs_server, xero_server = serve(HubSpotSandbox()), serve(XeroSandbox())
    try:
        yield hs_server, xero_server
    finally:
        hs_server.stop()
        xero_server.stop()


@pytest.fixture
def cli(tmp_path: Path, servers: tuple[SandboxServer, SandboxServer]) -> Cli:
    book = generate_book(SEED, companies=15, deals=30)
    hs = HubSpotSandbox(seed=SEED)
    hs.load_book(book)
    xero = XeroSandbox(seed=SEED)
    hs_server, xero_server = servers
    hs_server.app, xero_server.app = hs, xero
    config = write_config(tmp_path / "lb.yaml", hubspot_url=hs_server.url, xero_url=xero_server.url,
                          refresh_token=xero.issue_tokens()["refresh_token"],
                          state_url=f"sqlite:///{tmp_path / 'state.db'}", log_level="warning")
    won = [d for d in book.deals if d.is_won]
    return Cli(hs, xero, config, len(won), sum(1 for d in won if d.currency == "USD"))


def test_plan_run_and_run_again(cli: Cli) -> None:
    """plan lists every won deal as a create and writes nothing; run --once creates them; a second run nothing."""
    code, plan, _ = cli("plan", "--json")
    assert code == 0
    main = plan["main"]
    assert (main["status"], main["error"]) == ("ok", None)
    assert main["counts"]["create"] == cli.won == len(main["deals"])
    assert all(d["action"] == "create" and d["reason"] == "" and d["total"] and d["currency"] in ("EUR", "USD")
               for d in main["deals"])
    assert cli.xero.invoices() == []
    assert cli.xero.contacts() == []

    code, first, err = cli("run", "--once", "--json")
    assert code == 0, err
    assert first["main"]["status"] == "ok"
    assert first["main"]["counts"]["created"] == cli.won
    assert len(cli.xero.invoices()) == cli.won
    code, second, err = cli("run", "--once", "--json")
    assert code == 0, err
    assert second["main"]["counts"].get("created", 0) == 0
    assert second["main"]["run_id"] != first["main"]["run_id"]
    assert len(cli.xero.invoices()) == cli.won

    code, plan, _ = cli("plan", "--json")
    assert (code, plan["main"]["deals"], plan["main"]["counts"]) == (0, [], {})


def test_status_lists_runs_and_flags(cli: Cli) -> None:
    """A flagged deal makes run exit 1; status --json lists that run and the open flags with their reasons."""
    flagged = cli.config_with("flagged.yaml", "    invoice:\n      currencies: [EUR]\n")
    code, res, err = cli("run", "--once", "--json", config=flagged)
    assert code == 1, err
    assert res["main"]["status"] == "partial"
    assert res["main"]["counts"]["flagged"] == cli.usd_won > 0
    code, status, _ = cli("status", "--json", config=flagged)
    assert code == 0
    assert [(r["pipeline"], r["status"], r["counts"]["flagged"]) for r in status["runs"]] == [
        ("main", "partial", cli.usd_won)]
    flags = status["flags"]["main"]
    assert len(flags) == cli.usd_won
    assert {f["reason"] for f in flags} == {"currency_not_allowed"}
    assert all("USD" in f["detail"] for f in flags)
    code, plan, _ = cli("plan", "--json", config=flagged)
    assert code == 1
    assert {d["action"] for d in plan["main"]["deals"]} == {"flag"}

    # With USD allowed the flagged deals are invoiced, the run exits 0 and status shows no flag.
    code, res, err = cli("run", "--once", "--json")
    assert (code, res["main"]["counts"]["created"]) == (0, cli.usd_won), err
    code, status, _ = cli("status", "--json")
    assert status["flags"] == {"main": []}
    assert [r["status"] for r in status["runs"]] == ["ok", "partial"]


def test_run_without_once_is_refused(cli: Cli) -> None:
    """`run` without --once exits 2 pointing at --once and the daemon, and syncs nothing."""
    code, _, err = cli("run")
    assert code == 2
    assert "--once" in err
    assert "daemon" in err
    assert cli.xero.invoices() == []


@pytest.mark.parametrize("command", [("plan", "--json"), ("run", "--once", "--json"), ("status", "--json")])
def test_unknown_pipeline_is_bad_input(cli: Cli, command: tuple[str, ...]) -> None:
    """--pipeline with a name the config does not have exits 2 naming it and the known pipelines."""
    code, _, err = cli(*command, "--pipeline", "unknown")
    assert code == 2
    assert "'unknown'" in err
    assert "main" in err
    assert cli.xero.invoices() == []


def test_human_output_prints_crm_text_literally(cli: Cli) -> None:
    """Company names and vendor messages in flag details are printed as they are, never read as markup."""
    won_deal = next(d for d in cli.hs.deals_snapshot() if d.get("hs_is_closed_won") == "true")
    company = cli.hs.associated_ids("deals", won_deal["id"], "companies")[0]
    cli.hs.modify("companies", company, name="Atelier [/b] [red]Dupont[/red] SARL")
    # Without customer creation every won deal is flagged with its company's name in the detail.
    strict = cli.config_with("strict.yaml", "    customers:\n      create_missing: false\n")
    wide = {"COLUMNS": "400"}
    proc = run_cli("run", "--once", "-c", str(strict), env=wide)
    assert proc.returncode == 1, proc.stderr
    for command in ("status", "plan"):
        proc = run_cli(command, "-c", str(strict), env=wide)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode == (0 if command == "status" else 1)
        assert "Atelier [/b] [red]Dupont[/red] SARL" in proc.stdout
        assert "customer_unmatched" in proc.stdout
