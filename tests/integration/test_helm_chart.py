"""The Helm chart (deploy/helm/flowship) checked with a real ``helm`` and the Kubernetes API types.

``helm`` v3.22.0 and ``kube-strict`` (deploy/dev/kube-strict: strict decoding of every rendered object
into client-go's typed structs, then the API server's checks that need no cluster) are built from the Go module proxy by ``deploy/dev/build-helm`` and
``deploy/dev/build-kube-strict`` and cached under ~/.cache/flowship (the first helm build takes
minutes). Without Go the tests fail, naming what is missing: a chart that nobody rendered is not
a tested chart.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from gotools import go_tool

from flowship.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "flowship"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
MANIFESTS = REPO / "deploy" / "kubernetes" / "flowship.yaml"
CILIUM_PORTS = {4244, 4245, 9962, 9963, 9964, 9965}  # Hubble, Relay, Cilium's metrics (hostNetwork)
CREDENTIAL_KEYS = {"username", "password", "bearer_token", "api_key", "sasl_username", "sasl_password",
                   "ssl_key_password"}
CASES = [None, *EXAMPLES]
CASE_IDS = ["default", *(p.stem for p in EXAMPLES)]

Obj = dict[str, Any]

pytestmark = pytest.mark.timeout(1800)  # the first test builds helm (minutes on a busy machine)


@cache
def helm() -> str:
    return go_tool("build-helm")


@cache
def kube_strict() -> str:
    return go_tool("build-kube-strict")


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120)


def template(values: Path | None = None, *extra: str) -> subprocess.CompletedProcess[str]:
    files = ["-f", str(values)] if values else []
    return run_helm("template", "flowship", str(CHART), "--namespace", "flowship", *files, *extra)


@cache
def rendered_text(values: Path | None) -> str:
    proc = template(values)
    assert proc.returncode == 0, f"helm template ({values or 'default values'}) failed:\n{proc.stderr}"
    return proc.stdout


def rendered(values: Path | None) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(rendered_text(values)) if doc]


def objects(docs: list[Obj], kind: str) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind]


def workloads(docs: list[Obj]) -> list[Obj]:
    return [d for d in docs if d["kind"] in ("DaemonSet", "StatefulSet", "Deployment")]


def configs(docs: list[Obj]) -> dict[str, str]:
    """ConfigMap name -> the flowship config it carries."""
    return {d["metadata"]["name"]: d["data"]["flowship.yaml"] for d in objects(docs, "ConfigMap")
            if "flowship.yaml" in d.get("data", {})}


def config_of(docs: list[Obj], workload: Obj) -> tuple[Obj, dict]:
    """The flowship container of a workload and the config (parsed) its ConfigMap volume gives it."""
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    return container, yaml.safe_load(configs(docs)[volume["configMap"]["name"]])


def walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from walk(item, f"{path}[{i}]")
    yield path, value


# --- helm itself ----------------------------------------------------------------------------------------


def test_helm_lint_and_lint_strict() -> None:
    for strict in ([], ["--strict"]):
        proc = run_helm("lint", *strict, str(CHART))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout
    for example in EXAMPLES:
        proc = run_helm("lint", "--strict", str(CHART), "-f", str(example))
        assert proc.returncode == 0, f"{example.name}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("values", CASES, ids=CASE_IDS)
def test_every_rendered_object_decodes_strictly(values: Path | None) -> None:
    text = rendered_text(values)
    proc = subprocess.run([kube_strict()], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{values or 'default values'}: {proc.stderr}"
    docs = rendered(values)
    assert len(proc.stdout.splitlines()) == len(docs)
    assert {d["metadata"].get("namespace", "flowship") for d in docs} == {"flowship"}  # .Release.Namespace


POD = """apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: d, namespace: ns}}
spec:
  selector:
    matchLabels: {{app: a}}
  template:
    metadata:
      labels: {{app: a}}
    spec:
      containers:
        - name: c
          image: example.com/i:1
          ports: [{port}]
          volumeMounts: [{{name: {mount}, mountPath: /etc/c}}]
      volumes: [{{name: config, configMap: {{name: c}}}}]
"""


def test_kube_strict_rejects_what_the_api_server_would() -> None:
    """The checker itself: a misspelt field, a duplicate key, an unknown kind, and objects that decode but that
    the API server (or the kubelet) refuses, are errors naming the object and the field."""
    proc = subprocess.run([kube_strict()], input=POD.format(port="{name: metrics, containerPort: 9966}",
                                                            mount="config"), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "DaemonSet ns/d\n", proc.stderr
    good = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok}\ndata: {a: b}\n"
    cases = {
        "unknown field": ("apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: bad}\n"
                          "spec: {replica: 2, selector: {}, template: {}}\n", ['unknown field "spec.replica"']),
        "duplicate field": ("apiVersion: v1\nkind: Service\nmetadata: {name: dup}\n"
                            "spec:\n  clusterIP: None\n  clusterIP: None\n", ["Service dup", "clusterIP"]),
        "servicemonitor": ("apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: sm}\n"
                           "spec: {selector: {}, endpoints: [{port: metrics, intervall: 30s}]}\n",
                           ["ServiceMonitor sm", "intervall"]),
        "unknown kind": ("apiVersion: example.com/v1\nkind: Gadget\nmetadata: {name: g}\n", ["Gadget g"]),
        # decodes, but the API server or the kubelet would refuse it
        "port name": (POD.format(port="{name: metrics-of-the-agent, containerPort: 9966}", mount="config"),
                      ["DaemonSet ns/d", "spec.template.spec.containers[0].ports[0].name", "15"]),
        "missing volume": (POD.format(port="{name: metrics, containerPort: 9966}", mount="state"),
                           ["spec.template.spec.containers[0].volumeMounts[0].name: Not found: \"state\""]),
        "selector": (POD.format(port="{name: metrics, containerPort: 9966}", mount="config").replace(
            "matchLabels: {app: a}", "matchLabels: {app: b}"), ["does not match the template's labels"]),
        "namespace on a cluster-scoped kind": ("apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\n"
                                               "metadata: {name: r, namespace: x}\n",
                                               ["metadata.namespace: Forbidden"]),
        "label value": ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: l, labels: {a: 'not a value!'}}\n",
                        ["metadata.labels: Invalid value"]),
    }
    proc = subprocess.run([kube_strict()], input=good, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "ConfigMap ok\n", proc.stderr
    for what, (bad, words) in cases.items():
        proc = subprocess.run([kube_strict()], input=good + "---\n" + bad, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode != 0, f"{what}: accepted"
        for word in words:
            assert word in proc.stderr, f"{what}: {proc.stderr}"


# --- what the chart renders -----------------------------------------------------------------------------


def _container_env(container: Obj) -> dict[str, str]:
    """The environment the pod gives the container, with stand-ins for what Kubernetes fills in."""
    env = {}
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "fieldRef" in source:
            env[var["name"]] = "node-1"
        elif "secretKeyRef" in source:
            env[var["name"]] = f"from-secret-{source['secretKeyRef']['name']}"
        else:
            env[var["name"]] = var["value"]
    return env


def _secret_files_here(workload: Obj, container: Obj, config: Obj, root: Path) -> Obj:
    """The config with paths into the pod's Secret volumes moved under ``root``, where stand-in files are.

    ``flowship validate`` checks that TLS files exist; in the pod they come from the mounted Secret.
    """
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    mounts = {m["mountPath"].rstrip("/") + "/": root / m["name"] for m in container["volumeMounts"]
              if "secret" in volumes.get(m["name"], {})}

    def move(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        for mount, here in mounts.items():
            if isinstance(value, str) and value.startswith(mount):
                path = here / value[len(mount):]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("stand-in for a file of the mounted Secret\n")
                return str(path)
        return value

    return move(config)


@pytest.mark.parametrize("values", CASES, ids=CASE_IDS)
def test_rendered_configs_pass_flowship_validate(values: Path | None, tmp_path: Path) -> None:
    """Each workload's config validates with what its pod spec gives it: env (secrets resolved), Secret files."""
    docs = rendered(values)
    assert workloads(docs)
    for workload in workloads(docs):
        container, config = config_of(docs, workload)
        here = _secret_files_here(workload, container, config, tmp_path / "secrets")
        path = tmp_path / f"{workload['metadata']['name']}.yaml"
        (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
        # the ConfigMap's text as shipped, unless paths into Secret volumes had to be moved
        path.write_text(configs(docs)[volume["configMap"]["name"]] if here == config else yaml.safe_dump(here))
        clean = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSHIP_") and k != "NODE_NAME"}
        proc = subprocess.run([sys.executable, "-m", "flowship.cli", "validate", str(path)], capture_output=True,
                              text=True, timeout=120, env={**clean, **_container_env(container),
                                                           "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, f"{values or 'default'}: {workload['metadata']['name']}:\n{proc.stderr}"
        # the image's entrypoint is `flowship`: the args must be a command line it accepts, with this config
        args = build_parser().parse_args(container.get("command", [])[1:] + container["args"])
        assert args.command == ("agent" if workload["kind"] == "DaemonSet" else "export")
        assert args.config == "/etc/flowship/flowship.yaml"
        assert container["volumeMounts"][0] == {"name": "config", "mountPath": "/etc/flowship", "readOnly": True}


@pytest.mark.parametrize("values", CASES, ids=CASE_IDS)
def test_no_port_collides_with_cilium(values: Path | None) -> None:
    docs = rendered(values)
    ports: list[tuple[str, int]] = []
    for workload in workloads(docs):
        container, config = config_of(docs, workload)
        name = workload["metadata"]["name"]
        for port in container.get("ports", []):
            ports += [(f"{name} containerPort", port["containerPort"]),
                      (f"{name} hostPort", port.get("hostPort", port["containerPort"]))]
        ports.append((f"{name} metrics", int(config["metrics"].rsplit(":", 1)[1])))
        for source in config["sources"]:
            address = source.get("observer", {}).get("address", "unix:")
            if not address.startswith("unix:"):
                ports.append((f"{name} observer", int(address.rsplit(":", 1)[1])))
    for service in objects(docs, "Service"):
        ports += [(service["metadata"]["name"], p["port"]) for p in service["spec"]["ports"]]
    assert ports
    assert [p for p in ports if p[1] in CILIUM_PORTS] == []


def _volume_of(container: Obj, path: str) -> str:
    """The name of the volume that holds ``path`` in the container (the deepest mount wins)."""
    mounts = [m for m in container["volumeMounts"] if path == m["mountPath"]
              or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no volume"
    return max(mounts, key=lambda m: len(m["mountPath"]))["name"]


@pytest.mark.parametrize("values", CASES, ids=CASE_IDS)
def test_disk_buffers_and_state_live_on_persistent_volumes(values: Path | None) -> None:
    """Kafka offsets commit once a batch is in a disk buffer: the buffer must outlive the pod.

    Exporter: on the replica's volumeClaimTemplate (never an emptyDir, never a claim shared by replicas).
    Agent: on the node (hostPath), where the DaemonSet's next pod finds it.
    """
    docs = rendered(values)
    assert objects(docs, "Deployment") == []
    for workload in workloads(docs):
        container, config = config_of(docs, workload)
        spec = workload["spec"]
        pod = spec["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
        assert not [v for v in volumes.values() if "persistentVolumeClaim" in v], "a claim shared by replicas"

        data_dir = config["data_dir"]
        paths = [data_dir] + [s.get("buffer", {}).get("path", f"{data_dir}/buffers/{s.get('name', s['type'])}")
                              for s in config["sinks"] if s.get("buffer", {}).get("type") == "disk"]
        paths += [s["path"] for s in config["sinks"] if s["type"] == "parquet" and not s["path"].startswith("s3://")]
        for path in paths:
            volume = _volume_of(container, path)
            if workload["kind"] == "StatefulSet":
                assert volume in claims and volume not in volumes, f"{path} is not on a volumeClaimTemplate"
            else:
                assert "hostPath" in volumes[volume], f"{path} is not on the node's disk"
    (export,) = objects(docs, "StatefulSet") or [None]
    if export is not None:
        security = export["spec"]["template"]["spec"]["securityContext"]
        assert security["runAsUser"] == 65532 and security["fsGroup"] == 65532  # the volume is writable


@pytest.mark.parametrize("values", CASES, ids=CASE_IDS)
def test_credentials_only_from_secret_key_refs(values: Path | None) -> None:
    docs = rendered(values)
    assert objects(docs, "Secret") == []
    for workload in workloads(docs):
        container, config = config_of(docs, workload)
        env = {e["name"]: e for e in container.get("env", [])}
        for path, value in walk(config):
            key = path.rsplit(".", 1)[-1]
            if key in CREDENTIAL_KEYS:
                assert isinstance(value, str) and value.startswith("env:"), f"{path}: a literal credential"
            if isinstance(value, str) and value.startswith("env:"):
                name = value[4:]
                if name == "NODE_NAME":
                    assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
                else:
                    assert key in CREDENTIAL_KEYS, path
                    ref = env[name]["valueFrom"]["secretKeyRef"]
                    assert ref["name"] and ref["key"]


def test_examples_use_secrets_where_they_authenticate() -> None:
    """The examples show the secret path: each one that authenticates renders secretKeyRefs."""
    refs = {p.stem: rendered_text(p).count("secretKeyRef:") for p in EXAMPLES}
    assert refs["kafka-to-opensearch"] == 6 and refs["hubble-relay-to-loki"] == 1
    assert refs["agent-only-parquet"] == 0


def test_default_render_keeps_the_agent_and_exporter_shape() -> None:
    docs = rendered(None)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ServiceAccount", "ServiceAccount", "ConfigMap", "ConfigMap", "ClusterRole",
                            "ClusterRoleBinding", "Service", "Service", "DaemonSet", "StatefulSet",
                            "PodDisruptionBudget"])
    (agent,) = objects(docs, "DaemonSet")
    pod = agent["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["hostNetwork"] is True
    security = container["securityContext"]
    assert security["privileged"] is False and security["capabilities"] == {
        "drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"]}
    assert not [v for v in pod["volumes"] if v.get("hostPath", {}).get("path") == "/sys/fs/bpf"]
    for workload in workloads(docs):
        image = workload["spec"]["template"]["spec"]["containers"][0]
        assert re.fullmatch(r"[a-z0-9.-]+\.[a-z]+/[a-z0-9./-]+:0\.1\.0", image["image"]), image["image"]
        assert image["imagePullPolicy"] == "IfNotPresent"
    (export,) = objects(docs, "StatefulSet")
    assert export["spec"]["replicas"] == 2
    assert export["spec"]["serviceName"] in {s["metadata"]["name"] for s in objects(docs, "Service")}
    (pdb,) = objects(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == export["spec"]["selector"]["matchLabels"]
    _, config = config_of(docs, export)
    assert config["sources"][0]["group_id"] == "flowship-export"


def test_service_monitor_scrapes_both_metrics_services() -> None:
    docs = [d for d in yaml.safe_load_all(run_helm("template", "flowship", str(CHART), "--namespace", "flowship",
                                                   "--set", "serviceMonitor.enabled=true").stdout) if d]
    (monitor,) = objects(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [s for s in objects(docs, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert len(services) == 2
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    for service in services:
        assert ports <= {p["name"] for p in service["spec"]["ports"]}
        pods = [w for w in workloads(docs) if service["spec"]["selector"].items()
                <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1
    assert objects(rendered(None), "ServiceMonitor") == []  # off by default (the CRD may be missing)


# --- values the chart refuses ---------------------------------------------------------------------------

BAD_VALUES = {
    "loki without url": (["--set", "exporter.sinks.loki.url="],
                         "exporter.sinks.loki.url is required when exporter.sinks.loki.enabled is true"),
    "http without url": (["--set", "agent.sinks.http.enabled=true"],
                         "agent.sinks.http.url is required when agent.sinks.http.enabled is true"),
    "kafka sink without brokers": (["--set", "exporter.sinks.kafka.enabled=true"],
                                   "exporter.sinks.kafka.brokers is required"),
    "literal password": (["--set", "exporter.sinks.elasticsearch.settings.password=hunter2"],
                         "exporter.sinks.elasticsearch.settings.password: credentials are not written into "
                         "values; use exporter.sinks.elasticsearch.secrets.password"),
    "secret without key": (["--set", "exporter.sinks.loki.secrets.password.name=loki"],  # values.schema.json
                           "at '/exporter/sinks/loki/secrets/password': missing property 'key'"),
    "secret of no credential key": (["--set", "exporter.sinks.loki.secrets.token.name=a",
                                     "--set", "exporter.sinks.loki.secrets.token.key=b"],
                                    "invalid propertyName 'token'"),
    "metrics on cilium's port": (["--set", "agent.metricsPort=9965"],
                                 "agent.metricsPort: port 9965 is Cilium's (4244 Hubble, 4245 Hubble Relay, "
                                 "9962-9965 metrics)"),
    "exporter metrics on cilium's port": (["--set", "exporter.metricsPort=9962"],
                                          "exporter.metricsPort: port 9962 is Cilium's"),
    "observer on hubble's port": (["--set", "agent.observer.address=:4244"],
                                  "agent.observer.address: port 4244 is Cilium's"),
    "observer open without mTLS": (["--set", "agent.observer.address=:4246"],
                                   "agent.observer.address :4246 is reachable from the network: set "
                                   "agent.observer.tlsSecret"),
    "hubble source with two replicas": (["--set", "exporter.source.type=hubble"],
                                        "exporter.replicas is 2 with exporter.source.type hubble"),
    "no sink": (["--set", "agent.sinks.kafka.enabled=false"], "agent.sinks: enable at least one sink"),
    "parquet off the volume": (["--set", "exporter.sinks.parquet.path=/tmp/flows"],
                               "exporter.sinks.parquet.path must be s3://BUCKET/PREFIX or under /var/lib/flowship"),
    "chart value in settings": (["--set", "exporter.sinks.loki.settings.url=http://x"],
                                "exporter.sinks.loki.settings.url: set by the chart"),
    "unknown value": (["--set", "exporter.sinks.loki.urll=http://x"],
                      "at '/exporter/sinks/loki': additional properties 'urll' not allowed"),
}


@pytest.mark.parametrize("case", BAD_VALUES, ids=list(BAD_VALUES))
def test_bad_values_fail_with_a_clear_message(case: str) -> None:
    args, message = BAD_VALUES[case]
    proc = template(None, *args)
    assert proc.returncode != 0, f"{case}: rendered anyway"
    assert message in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr


def test_a_values_file_with_a_sink_but_no_url_fails(tmp_path: Path) -> None:
    values = tmp_path / "bad.yaml"
    values.write_text("exporter:\n  sinks:\n    elasticsearch:\n      enabled: true\n      url: ''\n")
    proc = template(values)
    assert proc.returncode != 0
    assert "exporter.sinks.elasticsearch.url is required when exporter.sinks.elasticsearch.enabled is true" \
        in proc.stderr


# --- the values reference ------------------------------------------------------------------------------


def _value_paths(values: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(values, dict) and values:
        for key, item in values.items():
            yield from _value_paths(item, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def test_docs_helm_md_describes_every_value_and_no_other() -> None:
    """docs/helm.md names each value of values.yaml (a sink's keys once, in its Sinks table), and only those."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    named = set(re.findall(r"`([A-Za-z][A-Za-z0-9_.*]*)`", (REPO / "docs" / "helm.md").read_text()))
    missing = []
    for path in _value_paths(values):
        parts = path.split(".")
        if "sinks" in parts:  # agent.sinks.loki.buffer.maxBytes -> buffer, buffer.maxBytes
            parts = parts[parts.index("sinks") + 2:]
            candidates = {".".join(parts[:k]) for k in range(1, len(parts) + 1)}
        else:  # agent.resources.requests.cpu -> agent.resources, ... (never just "agent")
            candidates = {".".join(parts[:k]) for k in range(min(2, len(parts)), len(parts) + 1)}
        if not candidates & named:
            missing.append(path)
    assert missing == [], "values not described in docs/helm.md"
    paths = set(_value_paths(values))
    unknown = [name for name in named if name.split(".")[0] in values and "." in name
               and not any(p == name.removesuffix(".*") or p.startswith(name.removesuffix("*").rstrip(".") + ".")
                           for p in paths)]
    assert unknown == [], "docs/helm.md names values the chart does not have"
    assert [p.name for p in EXAMPLES if f"`{p.name}`" not in (REPO / "docs" / "helm.md").read_text()] == []


# --- the plain manifests --------------------------------------------------------------------------------


def test_committed_manifests_are_a_fresh_render(tmp_path: Path) -> None:
    helm()  # build first, so that a missing Go is reported as such
    out = tmp_path / "flowship.yaml"
    proc = subprocess.run([str(REPO / "deploy" / "dev" / "render-manifests"), str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert MANIFESTS.read_text() == out.read_text(), \
        "deploy/kubernetes/flowship.yaml differs from the chart: run deploy/dev/render-manifests"
    docs = [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]
    assert docs[0] == {"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": "flowship", "labels": docs[0]["metadata"]["labels"]}}
    assert sorted(p.name for p in MANIFESTS.parent.glob("*.yaml")) == ["flowship.yaml"]
