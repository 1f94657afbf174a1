"""The plain manifests parse, and the flowship configs inside them validate and fit the manifests.

deploy/kubernetes/flowship.yaml is rendered from the Helm chart (deploy/dev/render-manifests); the chart with
every example values file is checked by tests/integration/test_helm_chart.py, which needs helm. These tests
read the committed file and need nothing but flowship.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flowship.agent.kubernetes import RESOURCES, SERVICE_ACCOUNT_DIR
from flowship.config import PipelineConfig, load_text

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
API_GROUPS = {"pods": "", "services": "", "nodes": "", "endpointslices": "discovery.k8s.io"}


def _docs() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(KUBE.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]


def _one(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_manifests_parse_and_embedded_configs_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "node-1")
    assert [name for name, _ in _docs()][:1] == ["flowship.yaml"] and _docs()[0][1]["kind"] == "Namespace"
    seen = []
    for name, doc in _docs():
        assert doc and doc.get("kind") and doc.get("apiVersion"), f"{name}: not a Kubernetes object"
        if doc["kind"] == "ConfigMap" and "flowship.yaml" in doc["data"]:
            config = load_text(doc["data"]["flowship.yaml"], f"{name}:{doc['metadata']['name']}")
            seen.append((config.sources[0].type, [s.type for s in config.sinks]))
        if doc["kind"] == "DaemonSet":
            caps = doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
            assert caps["drop"] == ["ALL"] and "BPF" in caps["add"]
    assert ("agent", ["kafka"]) in seen
    assert ("kafka", ["parquet", "elasticsearch", "loki"]) in seen


def _agent_config(monkeypatch: pytest.MonkeyPatch, node: str = "node-1") -> PipelineConfig:
    monkeypatch.setenv("NODE_NAME", node)
    return load_text(_one("ConfigMap", "flowship-agent")["data"]["flowship.yaml"], "deploy/kubernetes/flowship.yaml")


def test_daemonset_node_name_is_the_kubernetes_node_name(monkeypatch: pytest.MonkeyPatch) -> None:
    pod = _one("DaemonSet", "flowship-agent")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert _agent_config(monkeypatch, "ip-10-0-3-7.ec2.internal").node_name == "ip-10-0-3-7.ec2.internal"


def test_daemonset_enriches_from_the_api_with_the_rbac_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _agent_config(monkeypatch)
    agent = config.sources[0].config
    kube = agent.enrich.kubernetes
    assert kube is not None and kube.enabled, "the DaemonSet's agent config must enable Kubernetes enrichment"
    assert kube.kubeconfig is None and kube.service_account_dir == SERVICE_ACCOUNT_DIR  # in-cluster credentials
    assert set(kube.resources) == set(RESOURCES)

    pod = _one("DaemonSet", "flowship-agent")["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert pod.get("automountServiceAccountToken", True), "enrichment reads the mounted service-account token"
    sa = _one("ServiceAccount", account)
    binding = next(d for _, d in _docs() if d["kind"] == "ClusterRoleBinding"
                   and {"kind": "ServiceAccount", "name": account, "namespace": sa["metadata"]["namespace"]}
                   in d["subjects"])
    role = _one("ClusterRole", binding["roleRef"]["name"])
    for resource in kube.resources:
        rules = [r for r in role["rules"] if resource in r["resources"] and API_GROUPS[resource] in r["apiGroups"]]
        verbs = {v for r in rules for v in r["verbs"]}
        assert {"list", "watch"} <= verbs, f"ClusterRole {role['metadata']['name']} cannot list/watch {resource}"
