"""Builds what a run needs from a loaded config: the state store and each pipeline's connectors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from config.loader import LoadedConfig
from config.schema import ConnectorSettings, Pipeline
from connectors.errors import ConfigError
from connectors.interfaces import CrmSource, Ledger
from sync.engine import PipelineRunner
from sync.logging import configure_logging
from sync.state import StateStore

__all__ = ["Runtime", "effective_pipeline", "open_runtime"]


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
    def runner(self, name: str) -> Iterator[PipelineRunner]:
        pipeline = effective_pipeline(self.config.app.pipelines[name], self.config.ledger(name))
        tokens = self.store.token_store()
        crm_cls = self.config.crm_class(name)
        ledger_cls = self.config.ledger_class(name)
        crm: CrmSource = crm_cls.from_config(self.config.crm(name).model_dump(), tokens)
        ledger: Ledger = ledger_cls.from_config(self.config.ledger(name).model_dump(), tokens)
        try:
            yield PipelineRunner(name, pipeline, crm, ledger, self.store)
        finally:
            crm.close()
            ledger.close()

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
