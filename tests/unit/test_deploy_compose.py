"""deploy/compose checked as a file, since no Docker engine runs here: compose.yaml parses; every roost service
is there, built from the one Dockerfile, running a real `roost` command; every port, healthcheck, URL and
Prometheus target is one that a service of the file serves; Grafana's provisioning points at what exists;
no secret value is committed.  The Dockerfile and .dockerignore are checked too."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from tests.support.roost_commands import check_environment, resolve_command, service_order

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\}|\$\{[^{}]*\})*))?\}")


# -- helpers ---------------------------------------------------------------------------------------------


def env_example() -> dict[str, str]:
    values = {}
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` (nested) and ``${VAR:?error}``, as `docker compose` reads them."""
    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        if op in (":-", "-"):
            if value is None or (op == ":-" and value == ""):
                return interpolate(arg or "", env)
            return value
        if op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise AssertionError(f"${{{name}}} is required ({arg}) and .env.example does not set it")
            return value
        return value or ""

    previous = None
    while previous != text:
        previous, text = text, _VAR.sub(one, text)
    return text


def resolved(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolved(n, env) for n in node]
    if isinstance(node, dict):
        return {k: resolved(v, env) for k, v in node.items()}
    return node


def compose() -> dict[str, Any]:
    raw = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
    assert isinstance(raw, dict)
    result: dict[str, Any] = resolved(raw, env_example())
    return result


def roost_services(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The compose services that run `roost serve`, by the roost service they serve."""
    found: dict[str, dict[str, Any]] = {}
    for name, service in doc["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command[:1] == ["serve"]:
            assert len(command) == 2, f"{name}: one roost service per container ({command})"
            assert command[1] == name, f"compose service {name} serves {command[1]}: name them alike"
            found[command[1]] = service
    return found


def served_ports(doc: Mapping[str, Any]) -> dict[str, set[int]]:
    """What each compose service listens on, read from its own configuration (never assumed)."""
    from services.cli.serve import default_port

    order = service_order()
    ports: dict[str, set[int]] = {}
    for name, service in doc["services"].items():
        env = service.get("environment") or {}
        command = [str(c) for c in service.get("command") or []]
        if name in order:
            base = int(env.get("ROOST_HTTP_BASE_PORT", 8470))
            ports[name] = {default_port(name, base, order)}
        elif name == "nats":
            ports[name] = {int(command[command.index("--port") + 1]), int(command[command.index("--http_port") + 1])}
        elif name == "postgres":
            assert service["image"].startswith("postgres:"), service["image"]
            ports[name] = {5432}            # the image's port; PGPORT is not set
            assert "PGPORT" not in env
        elif name == "rabbitmq":
            assert service["image"].startswith("rabbitmq:3") and service["image"].endswith("-management")
            ports[name] = {5672, 15672}     # AMQP and the management plugin, the image's defaults
        elif name == "prometheus":
            listen = next(c for c in command if c.startswith("--web.listen-address="))
            ports[name] = {int(listen.rsplit(":", 1)[1])}
        elif name == "grafana":
            ports[name] = {int(env["GF_SERVER_HTTP_PORT"])}
        else:
            raise AssertionError(f"a compose service this test does not know: {name}")
    return ports


def points_at(url: str, doc: Mapping[str, Any], where: str, *, local: str | None = None) -> tuple[str, int]:
    """Assert ``url``'s host is a compose service (or ``local``: the container itself) listening on its port."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    assert host and port, f"{where}: {url!r} names no host and port"
    target = local if host in ("127.0.0.1", "localhost") and local else host
    ports = served_ports(doc)
    assert target in ports, f"{where}: {url!r} points at {host}, which is no service of compose.yaml"
    assert port in ports[target], f"{where}: {url!r}: {target} listens on {sorted(ports[target])}, not {port}"
    return target, port


# -- compose.yaml ----------------------------------------------------------------------------------------


def test_compose_parses_and_runs_every_roost_service_from_the_one_dockerfile() -> None:
    doc = compose()
    services = roost_services(doc)
    assert sorted(services) == sorted(service_order()), "every service `roost up` runs, once"
    images = set()
    for name, service in services.items():
        build = service["build"]
        context = (COMPOSE_DIR / build["context"]).resolve()
        assert context == ROOT, f"{name}: built from {context}"
        assert (context / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
        images.add(service["image"])
        assert service["restart"] == "unless-stopped"
    assert len(images) == 1, f"one image for every service, not {images}"
    brokers = {n for n in ("nats", "rabbitmq") if n in doc["services"]}
    assert brokers == {"nats", "rabbitmq"}
    assert doc["services"]["nats"]["profiles"] == ["nats"] and doc["services"]["rabbitmq"]["profiles"] == ["rabbitmq"]
    assert "--jetstream" in doc["services"]["nats"]["command"]
    assert env_example()["COMPOSE_PROFILES"] == "nats"
    for name in ("postgres", "prometheus", "grafana"):
        assert name in doc["services"]


def test_every_command_is_a_real_roost_command() -> None:
    doc = compose()
    order = service_order()
    commands = [s["command"] for s in doc["services"].values()
                if "build" in s or str(s.get("image", "")).startswith("roost:")]
    assert commands
    for command in commands:
        resolved_command, ctx = resolve_command(command)
        if resolved_command.name == "serve":
            for name in ctx.params["names"]:
                assert name in order, f"`roost serve {name}`: no such service (the services: {order})"


def test_resolving_a_command_that_does_not_exist_fails() -> None:
    with pytest.raises(AssertionError, match="no command 'serv'"):
        resolve_command(["serv", "core"])
    with pytest.raises(click.UsageError):
        resolve_command(["serve", "core", "--no-such-option"])


def test_ports_and_healthchecks_are_what_each_service_serves() -> None:
    doc = compose()
    for name, service in doc["services"].items():
        for mapping in service.get("ports", []):
            container = int(str(mapping).rsplit(":", 1)[1].split("/")[0])
            assert container in served_ports(doc)[name], f"{name} publishes {container}, which it does not serve"
    for name, service in roost_services(doc).items():
        env = service["environment"]
        assert env["ROOST_HTTP_HOST"] == "0.0.0.0", f"{name} must listen beyond the container's loopback"
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], test
        urls = re.findall(r"https?://[^'\"\s]+", test[3])
        assert len(urls) == 1
        assert urlsplit(urls[0]).path == "/readyz"
        points_at(urls[0], doc, f"{name} healthcheck", local=name)
    for name in ("nats", "prometheus", "grafana"):
        test = doc["services"][name]["healthcheck"]["test"]
        url = next(t for t in test if t.startswith("http"))
        points_at(url, doc, f"{name} healthcheck", local=name)


def test_environment_urls_point_at_services_of_the_file() -> None:
    doc = compose()
    for name, service in roost_services(doc).items():
        env = service["environment"]
        check_environment(env)
        bus, _ = points_at(env["ROOST_BUS_URL"], doc, f"{name} ROOST_BUS_URL")
        assert bus == "nats" and urlsplit(env["ROOST_BUS_URL"]).port == 4222
        database, _ = points_at(env["ROOST_DATABASE_URL"], doc, f"{name} ROOST_DATABASE_URL")
        assert database == "postgres"
        postgres = doc["services"]["postgres"]["environment"]
        assert urlsplit(env["ROOST_DATABASE_URL"]).path == "/" + postgres["POSTGRES_DB"]
        assert urlsplit(env["ROOST_DATABASE_URL"]).username == postgres["POSTGRES_USER"]
        for dependency in service["depends_on"]:
            assert dependency in doc["services"], f"{name} depends on {dependency}, which is not defined"
    # the RabbitMQ alternative .env.example describes points at the rabbitmq service and its user
    example = (COMPOSE_DIR / ".env.example").read_text()
    amqp = re.search(r"ROOST_BUS_URL=(amqp://\S+)", example)
    assert amqp is not None
    target, port = points_at(amqp.group(1), doc, ".env.example's RabbitMQ URL")
    assert (target, port) == ("rabbitmq", 5672)
    assert urlsplit(amqp.group(1)).username == doc["services"]["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"]


def test_prometheus_scrapes_every_service_where_it_serves() -> None:
    doc = compose()
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    mount = [v for v in doc["services"]["prometheus"]["volumes"] if v.startswith("./prometheus.yml:")]
    assert mount == ["./prometheus.yml:/etc/prometheus/prometheus.yml:ro"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in doc["services"]["prometheus"]["command"]
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = points_at(f"http://{target}", doc, f"prometheus job {job['job_name']}",
                                       local="prometheus")
                if host in service_order():
                    assert job.get("metrics_path", "/metrics") == "/metrics"
                    assert static["labels"]["service"] == host
                    assert host not in scraped, f"{host} scraped twice"
                    scraped[host] = port
    assert sorted(scraped) == sorted(service_order()), "every roost service's /metrics is scraped"


def test_grafana_is_provisioned_with_the_prometheus_datasource_and_the_dashboards_directory() -> None:
    doc = compose()
    grafana = doc["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith(".")}
    provisioning = (COMPOSE_DIR / mounts["/etc/grafana/provisioning"]).resolve()
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["type"] for d in datasources] == ["prometheus"]
    points_at(datasources[0]["url"], doc, "grafana datasource")
    assert urlsplit(datasources[0]["url"]).hostname == "prometheus"
    providers = yaml.safe_load((provisioning / "dashboards" / "roost.yml").read_text())["providers"]
    assert len(providers) == 1 and providers[0]["type"] == "file"
    path = providers[0]["options"]["path"]
    assert path in mounts, f"the dashboards provider reads {path}, which is not mounted"
    assert (COMPOSE_DIR / mounts[path]).resolve() == ROOT / "deploy" / "grafana" / "dashboards"
    assert (ROOT / "deploy" / "grafana" / "dashboards").is_dir()
    for dashboard in (ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"):
        assert yaml.safe_load(dashboard.read_text()), f"{dashboard.name} is empty"


def test_every_bind_mount_exists_and_every_named_volume_is_declared() -> None:
    doc = compose()
    for name, service in doc["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in doc["volumes"], f"{name} uses volume {source}, which is not declared"


def test_no_secret_value_is_committed() -> None:
    raw = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
    for name, service in raw["services"].items():
        env = service.get("environment") or {}
        for key, value in env.items():
            secret = any(word in key for word in ("PASS", "TOKEN", "SECRET"))
            if secret or re.search(r"://[^/]*:[^/@]*@", str(value)):
                assert "${" in str(value), f"{name}: {key} holds a literal secret; take it from .env"
        command = " ".join(str(c) for c in service.get("command") or [])
        if "--pass" in command:
            assert "${" in command
    example = env_example()
    for key, value in example.items():
        if "PASSWORD" in key:
            assert value in ("change-me", ""), f".env.example must not hold a real {key}"
    assert example["ROOST_BOOTSTRAP_ADMIN_TOKEN"] == ""
    gitignore = (ROOT / ".gitignore").read_text().splitlines()
    assert "deploy/compose/.env" in gitignore or "/deploy/compose/.env" in gitignore


# -- the Dockerfile --------------------------------------------------------------------------------------


def test_one_dockerfile_python_slim_non_root_roost_entrypoint() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    froms = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert froms and all(f == "python:3.11-slim" for f in froms), froms
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image runs as a non-root user"
    assert instructions.count('ENTRYPOINT ["roost"]') == 1
    assert any(line.startswith("RUN pip install") for line in instructions)
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()
               and not p.startswith("#")]
    for line in instructions:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
                assert source.rstrip("/") not in ignored, f"COPY {source}, which .dockerignore excludes"
    for excluded in (".git", ".venv", "tests"):
        assert excluded in ignored
    # the data dir of the compose services is the image's (owned by the non-root user)
    assert "ROOST_DATA_DIR=/var/lib/roost" in (ROOT / "Dockerfile").read_text()
