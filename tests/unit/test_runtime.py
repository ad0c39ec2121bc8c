"""What the runtime builds from a config: the effective pipeline of each ledger."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from config.loader import load_config
from sync.runtime import effective_pipeline

CONFIG = """\
pipelines:
  main:
    crm:
      type: hubspot
      access_token: t
    ledger:
      type: xero
      tenant_id: tenant
      client_id: client
      client_secret: secret
      refresh_token: refresh
      tax_types:
        "20": TAX009
        "5.5": TAX055
    taxes:
      map:
        "20": TAX001
        "10": TAX002
"""


def test_ledger_tax_types_take_precedence_over_the_pipeline_tax_map(tmp_path: Path) -> None:
    """A ledger block's tax_types override the pipeline's taxes.map rate by rate and add missing rates."""
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    loaded = load_config(path)
    pipeline = effective_pipeline(loaded.app.pipelines["main"], loaded.ledger("main"))
    rates = {k.normalize(): v for k, v in pipeline.taxes.map.items()}
    assert rates == {Decimal("2E+1"): "TAX009", Decimal("1E+1"): "TAX002", Decimal("5.5"): "TAX055"}
    # The config as loaded is untouched.
    assert {k.normalize() for k in loaded.app.pipelines["main"].taxes.map} == {Decimal("2E+1"), Decimal("1E+1")}
