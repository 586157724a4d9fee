"""What operators deploy with: every file parses and agrees with the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY

import notifyd.metrics  # noqa: F401  (declares the metrics)
from notifyd.config import from_mapping

DEPLOY = Path(__file__).parent.parent / "deploy"
K8S = DEPLOY / "k8s"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def declared_metrics() -> set[str]:
    """Sample names notifyd exposes (counters with _total, histograms with _bucket...)."""
    names = set()
    for family in REGISTRY.collect():
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


def test_every_manifest_parses_and_is_complete() -> None:
    kinds = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in documents(path):
            assert {"apiVersion", "kind"} <= set(doc), path
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"] == "notifyd", path
            kinds[doc["kind"]] = doc
    assert {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
        "ServiceMonitor",
    } <= set(kinds)
    listed = documents(K8S / "kustomization.yaml")[0]["resources"]
    assert sorted(listed) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )


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
        {**tomllib.loads(config_map["data"]["notifyd.toml"]), "auth": {"secret": "x"}}, "configmap"
    )
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = int(pre_stop[1]) + settings.server.shutdown_timeout
    assert settings.server.drain_seconds < settings.server.shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] > budget
    assert settings.history.backend == "stream"  # replicas resume from the shared stream


def test_compose_runs_two_replicas_on_one_rabbitmq_with_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"rabbitmq", "notifyd-1", "notifyd-2", "prometheus", "grafana"} <= set(services)
    for name in ("notifyd-1", "notifyd-2"):
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert "rabbitmq:5672" in service["environment"]["NOTIFYD_AMQP_URL"]
        assert service["environment"]["NOTIFYD_HISTORY_BACKEND"] == "stream"
    ids = {
        services[n]["environment"]["NOTIFYD_AMQP_REPLICA_ID"] for n in ("notifyd-1", "notifyd-2")
    }
    assert len(ids) == 2
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    assert {"notifyd-1:8080", "notifyd-2:8080"} <= targets


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
