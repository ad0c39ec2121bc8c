"""Builds what a run needs from a loaded config: the state store and each pipeline's connectors."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from config.loader import LoadedConfig
from config.schema import ConnectorSettings, Pipeline
from connectors.errors import ConfigError
from connectors.interfaces import CrmSource, Ledger
from sync.engine import PipelineRunner
from sync.logging import configure_logging
from sync.observability import connectors_built
from sync.state import StateStore

if TYPE_CHECKING:
    from metrics.run import MetricsReport

__all__ = ["JOBS", "JobOutcome", "Runtime", "effective_pipeline", "open_runtime"]

Job = Literal["sync", "ledger", "metrics"]
#: The jobs of a pipeline: the deal sync, the ledger pull (invoices, credit notes, payments), the metrics.
JOBS: tuple[Job, ...] = ("sync", "ledger", "metrics")


@dataclass
class JobOutcome:
    """How one job of one pipeline ended."""

    pipeline: str
    job: str
    status: str
    exit_code: int
    counts: Mapping[str, int] = field(default_factory=dict)
    api_calls: Mapping[str, int] = field(default_factory=dict)
    error: str | None = None
    #: A vendor refused the connection's authorisation for good (not a transient failure): the pipeline
    #: needs a person to authorise it again before it can run.
    needs_authorisation: bool = False


def effective_pipeline(pipeline: Pipeline, ledger_settings: ConnectorSettings) -> Pipeline:
    """The pipeline with the ledger block's own tax types laid over its tax map."""
    tax_types = getattr(ledger_settings, "tax_types", None)
    if not tax_types:
        return pipeline
    taxes = pipeline.taxes.model_copy(update={"map": {**pipeline.taxes.map, **tax_types}})
    return pipeline.model_copy(update={"taxes": taxes})


@dataclass
class Runtime:
    config: LoadedConfig
    store: StateStore

    def pipeline_names(self, only: str | None = None) -> list[str]:
        names = [n for n, p in self.config.app.pipelines.items() if p.enabled]
        if only is not None:
            if only not in self.config.app.pipelines:
                known = ", ".join(sorted(self.config.app.pipelines))
                raise ConfigError(f"{self.config.path}: no pipeline named {only!r} (known: {known})")
            return [only]
        return names

    @contextmanager
    def connectors(self, name: str) -> Iterator[tuple[Pipeline, CrmSource, Ledger]]:
        """The pipeline (ledger tax types applied) with its CRM and ledger connectors, closed afterwards."""
        pipeline = effective_pipeline(self.config.app.pipelines[name], self.config.ledger(name))
        tokens = self.store.token_store()
        crm_cls = self.config.crm_class(name)
        ledger_cls = self.config.ledger_class(name)
        crm: CrmSource = crm_cls.from_config(self.config.crm(name).model_dump(), tokens)
        try:
            ledger: Ledger = ledger_cls.from_config(self.config.ledger(name).model_dump(), tokens)
        except BaseException:
            crm.close()
            raise
        connectors_built(crm, ledger)  # a watching daemon reads their 429 counts and rate budgets
        try:
            yield pipeline, crm, ledger
        finally:
            crm.close()
            ledger.close()

    @contextmanager
    def runner(self, name: str, *, stop: Callable[[], bool] | None = None) -> Iterator[PipelineRunner]:
        with self.connectors(name) as (pipeline, crm, ledger):
            yield PipelineRunner(name, pipeline, crm, ledger, self.store, stop=stop)

    def metrics(self, name: str, *, dry_run: bool = False, as_of: dt.date | None = None,
                stop: Callable[[], bool] | None = None) -> MetricsReport:
        """Pull the ledger, compute the pipeline's metrics and write the changed values back to the CRM."""
        from metrics.run import run_metrics

        with self.connectors(name) as (pipeline, crm, ledger):
            config_dir = self.config.path.parent if self.config.path is not None else None
            return run_metrics(name, pipeline.metrics, crm, ledger, self.store, config_dir=config_dir,
                               as_of=as_of, dry_run=dry_run, stop=stop)

    def run_job(self, name: str, job: Job, *, stop: Callable[[], bool] | None = None) -> JobOutcome:
        """Run one job of pipeline ``name``; vendor problems end in the outcome, not raised.

        ``stop`` is asked at safe points (after a page of deals, a chunk of ledger facts or of written
        values): once it says True the job records what it did and ends ``partial``, its cursors standing
        after the last part recorded, so the next run goes on from there.
        """
        if job == "sync":
            with self.runner(name, stop=stop) as runner:
                res = runner.run()
            return JobOutcome(name, job, res.status, res.exit_code, dict(res.counts), dict(res.api_calls), res.error,
                              res.needs_authorisation)
        if job == "ledger":
            from sync.ledgerpull import LedgerPull

            with self.connectors(name) as (_pipeline, _crm, ledger):
                pulled = LedgerPull(name, ledger, self.store, stop=stop).run()
            return JobOutcome(name, job, pulled.status, pulled.exit_code, pulled.counts, pulled.api_calls,
                              pulled.error, pulled.needs_authorisation)
        if job == "metrics":
            try:
                report = self.metrics(name, stop=stop)
            except ConfigError as exc:  # a bad spend CSV, a missing exchange rate: the job fails, loudly
                return JobOutcome(name, job, "failed", 2, {}, {}, str(exc))
            counts = {"values_written": report.customers.values_written + report.deals.values_written,
                      "customers": len(report.result.customers) if report.result else 0}
            return JobOutcome(name, job, report.status, report.exit_code, counts, report.api_calls, report.error,
                              report.needs_authorisation)
        raise ValueError(f"unknown job {job!r}; jobs: {', '.join(JOBS)}")

    def close(self) -> None:
        self.store.close()


@contextmanager
def open_runtime(config: LoadedConfig, *, configure_logs: bool = True) -> Iterator[Runtime]:
    app = config.app
    if configure_logs:
        configure_logging(app.logging.level, app.logging.format)
    key = app.state.secret_key.get_secret_value() if app.state.secret_key else None
    store = StateStore.open(app.state.url, secret_key=key)
    rt = Runtime(config, store)
    try:
        yield rt
    finally:
        rt.close()
