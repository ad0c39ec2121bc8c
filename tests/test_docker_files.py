"""The container files stay coherent: the Dockerfile, the compose demo, the Kubernetes manifests and their configs."""

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
from sync.sandboxes import DEMO_XERO_REFRESH_TOKEN
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


def _runtime() -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """The runtime stage's ENTRYPOINT, CMD and instructions."""
    runtime = _stages(DOCKER / "Dockerfile")[-1]
    entry = _exec_form(next(a for k, a in runtime if k == "ENTRYPOINT"))
    cmd = _exec_form(next(a for k, a in runtime if k == "CMD"))
    return entry, cmd, runtime


def _image_user() -> str:
    return [a for k, a in _runtime()[2] if k == "USER"][-1].split(":")[0]


def _load_with_secret_files(config_text: str, env: dict[str, str], secrets_dir_var: str, tmp_path: Path,
                            name: str) -> tuple[Any, set[str]]:
    """Load a config as a container would, its secret files created under ``tmp_path``; returns it and the
    names of the secret files it reads."""
    files = set(re.findall(rf"_file: \$\{{{secrets_dir_var}:-[^}}]+\}}/(\w+)", config_text))
    for secret in files:
        (tmp_path / secret).write_text((generate_key() if secret == "state_key" else f"test-{secret}") + "\n")
    path = tmp_path / name
    path.write_text(config_text)
    return load_config(path, env={**env, secrets_dir_var: str(tmp_path)}), files


# ---- the compose demo --------------------------------------------------------------------------------


def test_compose_demo_runs_two_replicas_beside_the_sandboxes_on_postgresql(compose: dict[str, Any]) -> None:
    """PostgreSQL, one sandboxes container, two daemons in its network on ports of their own, all published."""
    services = compose["services"]
    assert set(services) == {"postgres", "sandboxes", "ledgerbridge-1", "ledgerbridge-2"}
    assert "healthcheck" in services["postgres"]
    entry, cmd, _ = _runtime()
    assert _option(cmd, "--config") is not None

    ports: list[str] = []
    for name in ("ledgerbridge-1", "ledgerbridge-2"):
        lb = services[name]
        build = lb["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
        assert lb["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert lb["depends_on"]["sandboxes"]["condition"] == "service_healthy"
        assert lb["network_mode"] == "service:sandboxes"
        argv = entry + lb["command"]
        port = _option(argv, "--port")
        assert port is not None
        ports.append(port)
        assert _option(argv, "--host") == "0.0.0.0"
        assert _option(argv, "--config") in [v.split(":")[1] for v in lb["volumes"]]
        assert [v.split(":")[0] for v in lb["volumes"]] == ["./config.demo.yaml"]
        assert f"127.0.0.1:{port}/healthz" in " ".join(lb["healthcheck"]["test"]), "the image's check names 8080"
        assert lb["secrets"] == ["state_key"]
        url = lb["environment"]["LEDGERBRIDGE_STATE_URL"]
        assert url.startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in url
        assert ":" not in url.split("://", 1)[1].split("@", 1)[0], "no password in the state URL"
        assert lb["stop_grace_period"] in ("45s", "1m", "2m")
    assert len(set(ports)) == 2, "the replicas share one network: each needs a port of its own"

    sandboxes = services["sandboxes"]
    published = {str(p).rsplit(":", 1)[-1] for p in sandboxes["ports"]}
    assert set(ports) <= published  # the daemons' ports are the sandboxes container's
    script = " ".join(sandboxes["command"])
    served = dict(re.findall(r"ledgerbridge sandbox serve (\w+) --port (\d+)", script))
    assert served == {"hubspot": "8101", "xero": "8102"}
    assert set(served.values()) <= published
    defined = set(compose.get("secrets", {}))
    assert all(s in defined for svc in services.values() for s in svc.get("secrets", []))


def test_compose_demo_config_points_at_the_sandboxes_and_loads_with_the_compose_environment(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    lb = compose["services"]["ledgerbridge-1"]
    sandboxes = compose["services"]["sandboxes"]
    text = (DOCKER / "config.demo.yaml").read_text()
    served = dict(re.findall(r"ledgerbridge sandbox serve (\w+) --port (\d+)", " ".join(sandboxes["command"])))
    env = {k: str(v) for k, v in lb["environment"].items() if not str(v).startswith("${")}
    loaded, files = _load_with_secret_files(text, env, "LEDGERBRIDGE_SECRETS_DIR", tmp_path, "demo.yaml")
    assert files == set(lb["secrets"])
    assert loaded.app.state.url == env["LEDGERBRIDGE_STATE_URL"]
    assert loaded.app.state.secret_key is not None
    pipelines = [n for n, p in loaded.app.pipelines.items() if p.enabled]
    assert pipelines == ["acme-fr"]
    crm, ledger = loaded.crm("acme-fr").model_dump(), loaded.ledger("acme-fr").model_dump()
    assert crm["base_url"] == f"http://127.0.0.1:{served['hubspot']}"
    assert ledger["base_url"] == f"http://127.0.0.1:{served['xero']}"
    assert ledger["token_url"].startswith(f"http://127.0.0.1:{served['xero']}/")
    assert ledger["refresh_token"].get_secret_value() == DEMO_XERO_REFRESH_TOKEN


# ---- Kubernetes ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    """Every manifest under docker/k8s/ by kind (one of each)."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted((DOCKER / "k8s").glob("*.yaml")):
        for doc in YAML(typ="safe").load_all(path.read_text()):
            assert doc["kind"] not in docs, f"two {doc['kind']} manifests"
            docs[doc["kind"]] = doc
    return docs


def test_kustomization_lists_every_manifest(k8s: dict[str, dict[str, Any]]) -> None:
    listed = set(k8s["Kustomization"]["resources"])
    assert listed == {p.name for p in (DOCKER / "k8s").glob("*.yaml")} - {"kustomization.yaml"}


def test_deployment_runs_two_non_root_replicas_probed_on_readyz_and_healthz(k8s: dict[str, dict[str, Any]]) -> None:
    deployment = k8s["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    [container] = pod["containers"]
    entry, _cmd, _ = _runtime()
    argv = entry + container["args"]
    port = int(_option(argv, "--port") or 8080)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"ops": port}

    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in ("ops", port)
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port

    user = _image_user()
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == user != "0"
    box = container["securityContext"]
    assert box["allowPrivilegeEscalation"] is False
    assert box["readOnlyRootFilesystem"] is True
    assert box["capabilities"]["drop"] == ["ALL"]

    # SIGTERM waits for runs in flight up to --stop-timeout: the grace period must be longer.
    assert pod["terminationGracePeriodSeconds"] > float(_option(argv, "--stop-timeout") or 30)

    service = k8s["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["ops"]


def test_deployment_mounts_the_configmap_and_the_secret_its_config_reads(
    k8s: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    configmap, secret = k8s["ConfigMap"], k8s["Secret"]

    config_volume = volumes["config"]["configMap"]
    assert config_volume["name"] == configmap["metadata"]["name"]
    assert all("subPath" not in m for m in container["volumeMounts"]), "a subPath mount never sees updates"
    config_path = _option(container["args"], "--config")
    assert config_path == f"{mounts['config']}/{config_volume['items'][0]['path']}"
    assert config_volume["items"][0]["key"] == "config.yaml"

    # The ConfigMap carries config.example.yaml as it is.
    assert configmap["data"]["config.yaml"] == (DOCKER / "config.example.yaml").read_text()

    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == configmap["metadata"]["name"]
            env[var["name"]] = configmap["data"][ref["key"]]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in secret["stringData"]
    assert "PGPASSWORD" in {v["name"] for v in container["env"]}
    text = configmap["data"]["config.yaml"]
    needed = set(re.findall(r"\$\{([A-Z0-9_]+)\}", text))
    assert needed <= set(env), needed - set(env)

    secret_volume = volumes["secrets"]["secret"]
    assert secret_volume["secretName"] == secret["metadata"]["name"]
    assert env["LEDGERBRIDGE_SECRETS_DIR"] == mounts["secrets"]
    mounted = {i["path"] for i in secret_volume["items"]}
    assert {i["key"] for i in secret_volume["items"]} <= set(secret["stringData"])
    loaded, files = _load_with_secret_files(text, env, "LEDGERBRIDGE_SECRETS_DIR", tmp_path, "config.yaml")
    assert files == mounted, "the config reads exactly the secret files the pod mounts"
    assert loaded.app.state.url.startswith("postgresql+psycopg://")
    assert loaded.app.state.secret_key is not None
    assert ":" not in loaded.app.state.url.split("://", 1)[1].split("@", 1)[0], "no password in the state URL"
    assert secret_volume["defaultMode"] == 0o400
    assert all(v.startswith("REPLACE") for v in secret["stringData"].values()), "no real secret is committed"
