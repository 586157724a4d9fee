"""What operators deploy with: every file parses and agrees with the code."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from notifyd.config import from_mapping, load
from notifyd.metrics import Metrics

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
#: An overlay of K8S that adds what needs the Prometheus Operator's CRDs.
K8S_OPERATOR = DEPLOY / "k8s-prometheus-operator"
#: An overlay of K8S with a 3-node RabbitmqCluster (the RabbitMQ Cluster Operator's CRD).
K8S_RABBITMQ = DEPLOY / "k8s-rabbitmq"
#: The compose file's RabbitMQ cluster.
RABBIT_NODES = ("rabbitmq-0", "rabbitmq-1", "rabbitmq-2")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
#: Long and random enough for HS256: the manifests' own values are placeholders.
SECRET = "9b1f0e6c2d8a4f7e3c5b1a0d9e8f7c6b"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def declared_metrics() -> set[str]:
    """Sample names notifyd exposes (counters with _total, histograms with _bucket...)."""
    names = set()
    for family in Metrics().registry.collect():
        if family.name.startswith("notifyd_"):
            names.update(sample_names(family.name, family.type))
    return names


def sample_names(name: str, kind: str) -> set[str]:
    if kind == "counter":
        return {f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


def used_metrics(expression: str) -> set[str]:
    return set(re.findall(r"\bnotifyd_[a-z_]+", expression))


def manifests(directory: Path) -> dict[str, dict[str, Any]]:
    """``{kind: document}`` of a kustomization's own files, which it must all list."""
    kinds = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in documents(path):
            assert {"apiVersion", "kind"} <= set(doc), path
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"] == "notifyd", path
            kinds[doc["kind"]] = doc
    own = [p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"]
    listed = documents(directory / "kustomization.yaml")[0]["resources"]
    assert sorted(r for r in listed if r.endswith(".yaml")) == sorted(own)
    return kinds


def test_every_manifest_parses_and_is_complete() -> None:
    kinds = manifests(K8S)
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret"} <= set(kinds)
    # Only built-in kinds: `kubectl apply -k deploy/k8s` needs no operator's CRDs.
    builtin = ("v1", "apps/v1", "policy/v1", "kustomize.config.k8s.io/v1beta1")
    assert all(doc["apiVersion"] in builtin for doc in kinds.values()), kinds


def test_the_service_monitor_is_an_optional_overlay() -> None:
    """Issue 13.19: the ServiceMonitor made the base need the Prometheus Operator."""
    kinds = manifests(K8S_OPERATOR)
    assert set(kinds) == {"Kustomization", "ServiceMonitor"}
    assert "../k8s" in kinds["Kustomization"]["resources"]
    monitor = kinds["ServiceMonitor"]
    service = documents(K8S / "service.yaml")[0]
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_kustomize_builds_all_three() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (the YAML checks above still ran)")
    for directory, extra in ((K8S, None), (K8S_OPERATOR, "ServiceMonitor"),
                             (K8S_RABBITMQ, "RabbitmqCluster")):  # fmt: skip
        built = subprocess.run([kubectl, "kustomize", str(directory)],
                               capture_output=True, text=True, check=False)  # fmt: skip
        assert built.returncode == 0, built.stderr
        docs = list(yaml.safe_load_all(built.stdout))
        kinds = {doc["kind"] for doc in docs}
        assert kinds - {"Deployment", "Service", "Secret", "ConfigMap", "PodDisruptionBudget"} == (
            {extra} if extra else set()
        )
        if extra == "RabbitmqCluster":
            deployment = next(d for d in docs if d["kind"] == "Deployment")
            env = [
                e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            ]
            # $(VAR) in a value expands only variables defined before it.
            assert env.index("RABBITMQ_PASSWORD") < env.index("NOTIFYD_AMQP_URLS"), env


def test_the_rabbitmq_overlay_points_notifyd_at_every_node() -> None:
    """Issue 14: a 3-node cluster, and notifyd connecting to each node by its name."""
    kustomization = documents(K8S_RABBITMQ / "kustomization.yaml")[0]
    assert "../k8s" in kustomization["resources"]
    cluster = documents(K8S_RABBITMQ / "rabbitmqcluster.yaml")[0]
    assert (cluster["apiVersion"], cluster["kind"]) == ("rabbitmq.com/v1beta1", "RabbitmqCluster")
    assert cluster["spec"]["replicas"] == 3
    name = cluster["metadata"]["name"]
    # Not "notifyd": the operator names the cluster's client Service after it.
    assert name != documents(K8S / "service.yaml")[0]["metadata"]["name"]
    patch = documents(K8S_RABBITMQ / "deployment-amqp-urls.yaml")[0]
    env = {e["name"]: e for e in patch["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RABBITMQ_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == f"{name}-default-user"
    values = {
        "NOTIFYD_AMQP_URLS": env["NOTIFYD_AMQP_URLS"]["value"]
        .replace("$(RABBITMQ_USERNAME)", "user").replace("$(RABBITMQ_PASSWORD)", "pw"),
        "NOTIFYD_AMQP_CLOSE_SOCKETS_AFTER": env["NOTIFYD_AMQP_CLOSE_SOCKETS_AFTER"]["value"],
    }  # fmt: skip
    settings = load(environ={**values, "NOTIFYD_AUTH_SECRET": SECRET})
    assert settings.amqp.node_urls == tuple(
        f"amqp://user:pw@{name}-server-{n}.{name}-nodes:5672/" for n in range(3)
    )
    assert settings.amqp.queue_type == "quorum" and settings.amqp.close_sockets_after > 0


def test_deployment_probes_drain_and_limits_match_notifyd() -> None:
    deployment = next(d for d in documents(K8S / "deployment.yaml") if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = {e["name"] for e in container["env"]}
    assert {"NOTIFYD_AMQP_URL", "NOTIFYD_AUTH_SECRET"} <= env

    config_map = documents(K8S / "configmap.yaml")[0]
    settings = from_mapping(
        {**tomllib.loads(config_map["data"]["notifyd.toml"]), "auth": {"secret": SECRET}},
        "configmap",
    )
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = int(pre_stop[1]) + settings.server.shutdown_timeout
    assert settings.server.drain_seconds < settings.server.shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] > budget
    assert settings.history.backend == "stream"  # replicas resume from the shared stream


def test_compose_runs_two_replicas_on_a_rabbitmq_cluster_with_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {*RABBIT_NODES, "notifyd-1", "notifyd-2", "prometheus", "grafana"} <= set(services)
    for name in ("notifyd-1", "notifyd-2"):
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["build"]["context"] == ".."  # where .dockerignore is
        environment = service["environment"]
        settings = load(environ={k: v for k, v in environment.items() if "${" not in v})
        # Every node of the cluster, by the name compose gives it (issue 14).
        assert [u.split("@")[1] for u in settings.amqp.node_urls] == [
            f"{node}:5672/" for node in RABBIT_NODES
        ]
        assert set(service["depends_on"]) == set(RABBIT_NODES)
        assert settings.amqp.close_sockets_after > 0 and settings.amqp.queue_type == "quorum"
        assert environment["NOTIFYD_HISTORY_BACKEND"] == "stream"
    ids = {
        services[n]["environment"]["NOTIFYD_AMQP_REPLICA_ID"] for n in ("notifyd-1", "notifyd-2")
    }
    assert len(ids) == 2
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins
    cluster_conf = (DEPLOY / "rabbitmq" / "cluster.conf").read_text()
    for node in RABBIT_NODES:
        assert f"rabbit@{node}" in cluster_conf
        rabbit = services[node]
        assert rabbit["hostname"] == node
        assert any(
            v.endswith(":/etc/rabbitmq/conf.d/20-cluster.conf:ro") for v in rabbit["volumes"]
        )
    # One Erlang cookie for the three: they could not cluster otherwise.
    cookies = {services[n]["environment"]["RABBITMQ_ERLANG_COOKIE"] for n in RABBIT_NODES}
    assert len(cookies) == 1
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    assert {"notifyd-1:8080", "notifyd-2:8080"} <= targets
    assert {f"{node}:15692" for node in RABBIT_NODES} <= targets


def test_compose_keeps_amqp_the_demo_and_secrets_to_itself() -> None:
    """Issue 13.19: it published 5672 (clashing with `make run`) and enabled the demo."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    published = [
        str(port) for service in compose["services"].values() for port in service.get("ports", [])
    ]
    assert published and all(port.startswith("127.0.0.1:") for port in published), published
    assert not [port for port in published if port.split(":")[-1] == "5672"], published
    for name in ("notifyd-1", "notifyd-2"):
        environment = compose["services"][name]["environment"]
        assert environment["NOTIFYD_DEMO_ENABLED"] == "${NOTIFYD_DEMO_ENABLED:-false}"
        # No secret in the file: compose refuses to start until one is given.
        assert environment["NOTIFYD_AUTH_SECRET"].startswith("${NOTIFYD_AUTH_SECRET:?")
        assert environment["NOTIFYD_API_SERVICE_KEYS"] == "${NOTIFYD_API_SERVICE_KEYS:-}"


def test_one_image_tag_everywhere() -> None:
    tag = f"notifyd:{VERSION}"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    deployment = next(d for d in documents(K8S / "deployment.yaml") if d["kind"] == "Deployment")
    used = {
        compose["x-notifyd"]["image"],
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
    }
    for doc in (DEPLOY / "Dockerfile", DEPLOY / "README.md", ROOT / "README.md"):
        used.update(re.findall(r"docker build\b[^`\n]*-t (\S+)", doc.read_text()))
    assert used == {tag}


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or a parent of it wins.

    fnmatch's ``*`` also crosses ``/``, as Docker's ``**`` does; ``**/x`` also matches
    a top-level ``x``.
    """
    parts = path.split("/")
    parents = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for line in patterns:
        pattern = line.removeprefix("!").rstrip("/")
        forms = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatch(p, form) for p in parents for form in forms):
            ignored = not line.startswith("!")
    return ignored


def test_dockerignore_sends_only_what_the_image_copies() -> None:
    """Issue 13.19: without it the build context was the whole checkout (.venv, .git...)."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (DEPLOY / "Dockerfile").read_text(), re.M)
    sources = [source for line in copied for source in line.split()]
    assert sources
    for source in sources:
        assert not dockerignored(source.removeprefix("./"), patterns), source
    assert not dockerignored("notifyd/static/notifyd.js", patterns)
    for kept_out in (".venv/bin/python", ".git/config", "tests/conftest.py", "benchmarks/run.py",
                     "notifyd/__pycache__/app.cpython-311.pyc", ".run/x", "deploy/Dockerfile"):  # fmt: skip
        assert dockerignored(kept_out, patterns), kept_out


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert "HEALTHCHECK" in text and "/healthz" in text


def test_dashboard_and_alerts_use_only_metrics_notifyd_exports() -> None:
    exported = declared_metrics()
    assert (
        "notifyd_connections" in exported and "notifyd_delivery_latency_seconds_bucket" in exported
    )
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "notifyd.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    expressions += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*(used_metrics(e) for e in expressions))
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("connections", "users", "delivered", "latency", "dropped", "broker"):
        assert topic in titles, topic
    alert_names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"NotifydBrokerDisconnected", "NotifydDropRateHigh", "NotifydLatencyP99High",
            "NotifydSlowConsumerDisconnects"} <= alert_names  # fmt: skip


def test_promtool_accepts_the_rules_and_the_config(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make setup-test` installs Debian's prometheus package"
    rules = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # check config resolves rule_files: point it at the real file.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
