"""The container files stay coherent: the Dockerfile, the compose file and the config file they mount."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from config.loader import load_config
from sync.crypto import generate_key
from tests.harness import REPO

DOCKER = REPO / "docker"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and blank lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(dockerfile):
        if ins[0] == "FROM":
            stages.append([])
        assert stages, "an instruction before the first FROM"
        stages[-1].append(ins)
    return stages


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON) form: {args}"
    return [str(v) for v in value]


def _option(argv: list[str], name: str) -> str | None:
    """The last value of ``--name VALUE`` in ``argv`` (the CLI keeps the last one)."""
    found = None
    for i, arg in enumerate(argv[:-1]):
        if arg == name:
            found = argv[i + 1]
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = YAML(typ="safe").load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_dockerfile_is_multi_stage_non_root_with_healthcheck_and_daemon_entrypoint() -> None:
    """Runtime stage: a non-root USER, a HEALTHCHECK on /healthz at the daemon's port, `ledgerbridge daemon`."""
    stages = _stages(DOCKER / "Dockerfile")
    assert len(stages) >= 2, "the image is built in several stages"
    runtime = stages[-1]
    kinds = [k for k, _ in runtime]
    assert any("--from=build" in a or "from=build" in a for k, a in runtime if k in ("COPY", "RUN")), \
        "the runtime stage takes the build stage's wheels"
    assert not any(k == "RUN" and re.search(r"\b(gcc|build-essential)\b", a) for k, a in runtime)

    users = [a for k, a in runtime if k == "USER"]
    assert users, "the runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the daemon must not run as root"
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")

    entry = _exec_form(next(a for k, a in runtime if k == "ENTRYPOINT"))
    assert entry[:2] == ["ledgerbridge", "daemon"]
    assert _option(entry, "--host") == "0.0.0.0", "inside the container the ops endpoint must listen on all interfaces"
    port = _option(entry, "--port") or "8080"
    cmd = _exec_form(next(a for k, a in runtime if k == "CMD"))
    assert _option(cmd, "--config") is not None

    health = next(a for k, a in runtime if k == "HEALTHCHECK")
    assert f"127.0.0.1:{port}/healthz" in health
    assert port in [a.split("/")[0] for k, a in runtime if k == "EXPOSE"]

    # The console script the entry point runs exists.
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ledgerbridge"] == "sync.cli:main"


def test_build_context_ignore_file_keeps_what_the_dockerfile_copies() -> None:
    """Every COPY source of the build stage is re-included by docker/Dockerfile.dockerignore."""
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    sources: list[str] = []
    for kind, args in _stages(DOCKER / "Dockerfile")[0]:
        if kind == "COPY" and "--from" not in args:
            sources += shlex.split(args)[:-1]
    assert sources
    for src in sources:
        assert src.rstrip("/") in included, f"{src} is copied but excluded from the build context"
        assert (REPO / src).exists(), f"{src} does not exist"


def test_compose_file_is_coherent_with_the_image_and_secrets(compose: dict[str, Any]) -> None:
    """The daemon service builds the Dockerfile, waits for a healthy PostgreSQL, publishes 8080, mounts the config."""
    services = compose["services"]
    assert set(services) >= {"postgres", "ledgerbridge"}
    pg, lb = services["postgres"], services["ledgerbridge"]
    assert "healthcheck" in pg
    assert lb["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert (DOCKER / lb["build"]["context"] / lb["build"]["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()

    runtime = _stages(DOCKER / "Dockerfile")[-1]
    entry = _exec_form(next(a for k, a in runtime if k == "ENTRYPOINT"))
    cmd = _exec_form(next(a for k, a in runtime if k == "CMD"))
    port = _option(entry, "--port") or "8080"
    assert any(str(p).split(":")[-1] == port for p in lb["ports"])
    targets = [v.split(":")[1] for v in lb["volumes"]]
    assert _option(cmd, "--config") in targets, "the config file is mounted where the image's CMD reads it"

    defined = set(compose.get("secrets", {}))
    for name, service in services.items():
        for secret in service.get("secrets", []):
            secret_name = secret if isinstance(secret, str) else secret["source"]
            assert secret_name in defined, f"{name} uses undefined secret {secret_name}"
    assert "state_key" in lb["secrets"]

    state_url = lb["environment"]["LEDGERBRIDGE_STATE_URL"]
    assert state_url.startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in state_url
    assert ":" not in state_url.split("://", 1)[1].split("@", 1)[0], "no password in the state URL"


def test_example_config_loads_with_the_compose_environment(compose: dict[str, Any], tmp_path: Path) -> None:
    """config.example.yaml validates with the daemon service's environment; its secret files are its secrets."""
    lb = compose["services"]["ledgerbridge"]
    text = (DOCKER / "config.example.yaml").read_text()

    # Every variable the file needs without a default is set by the service.
    needed = set(re.findall(r"\$\{([A-Z0-9_]+)\}", text))
    assert needed <= set(lb["environment"]), needed - set(lb["environment"])

    # Its secret files, under the service's secrets directory, are exactly the service's secrets.
    secrets_dir = lb["environment"]["LEDGERBRIDGE_SECRETS_DIR"]
    files = set(re.findall(r"_file: \$\{LEDGERBRIDGE_SECRETS_DIR:-([^}]+)\}/(\w+)", text))
    assert files
    assert {d for d, _ in files} == {secrets_dir}
    assert {name for _, name in files} == set(lb["secrets"])

    # Loaded as the container would (with the secrets somewhere readable here), it is valid.
    for _, name in files:
        (tmp_path / name).write_text((generate_key() if name == "state_key" else f"test-{name}") + "\n")
    env = {k: str(v) for k, v in lb["environment"].items() if not str(v).startswith("${")}
    env.update({"LEDGERBRIDGE_SECRETS_DIR": str(tmp_path), "XERO_TENANT_ID": "tenant", "XERO_CLIENT_ID": "client"})
    loaded = load_config(DOCKER / "config.example.yaml", env=env)
    assert loaded.app.state.url == env["LEDGERBRIDGE_STATE_URL"]
    assert loaded.app.state.secret_key is not None
    assert loaded.app.state.secret_key.get_secret_value() == (tmp_path / "state_key").read_text().strip()
    assert set(loaded.app.pipelines) == {"main"}
