"""Enrichment from the Kubernetes API, against a local server replaying list/watch responses.

No cluster exists here, so the test runs an HTTPS server that behaves like the
API server for the four resources the enricher watches: paged lists with a
resourceVersion, chunked watch streams of ADDED/MODIFIED/DELETED/BOOKMARK
events, 410 Gone for compacted resourceVersions, dropped connections, bearer
token and client-certificate authentication.
"""

from __future__ import annotations

import base64
import copy
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from certs import make_pki

from flowship.agent.enrich import EnrichConfig, Enricher, identity_for_labels
from flowship.agent.kubernetes import KubeConfigError, in_cluster_credentials, kubeconfig_credentials
from flowship.config import parse
from flowship.metrics import Metrics
from flowship.model.schema import flows_from_rows

TOKEN = "eyJhbGciOiJSUzI1NiJ9.test-token"

PATHS = {
    "/api/v1/pods": ("PodList", "v1"),
    "/api/v1/services": ("ServiceList", "v1"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSliceList", "discovery.k8s.io/v1"),
    "/api/v1/nodes": ("NodeList", "v1"),
}


# -- realistic objects ------------------------------------------------------------------------

def pod(name: str, ns: str, ip: str, labels: dict, owner: tuple[str, str] | None, sa: str = "default",
        node: str = "node-1", host_network: bool = False, phase: str = "Running") -> dict:
    meta = {"name": name, "namespace": ns, "uid": f"uid-pod-{ns}-{name}", "labels": labels,
            "creationTimestamp": "2026-11-20T10:00:00Z"}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1],
                                    "uid": f"uid-{owner[1]}", "controller": True, "blockOwnerDeletion": True}]
    return {
        "kind": "Pod", "apiVersion": "v1", "metadata": meta,
        "spec": {"serviceAccountName": sa, "nodeName": node, "hostNetwork": host_network,
                 "containers": [{"name": "app", "image": f"registry.example/{name}:1.0",
                                 "ports": [{"containerPort": 8080, "protocol": "TCP"}]}]},
        "status": {"phase": phase, "hostIP": "10.0.0.11", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def service(name: str, ns: str, cluster_ip: str, port: int) -> dict:
    return {
        "kind": "Service", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-svc-{ns}-{name}"},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ipFamilies": ["IPv4"], "selector": {"app": name},
                 "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]},
        "status": {"loadBalancer": {}},
    }


def endpoint_slice(name: str, ns: str, svc: str, addrs: list[tuple[str, str | None]]) -> dict:
    return {
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-eps-{ns}-{name}",
                     "labels": {"kubernetes.io/service-name": svc,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True, "serving": True, "terminating": False},
                       **({"targetRef": {"kind": "Pod", "namespace": ns, "name": target,
                                         "uid": f"uid-pod-{ns}-{target}"}} if target else {}),
                       "nodeName": "node-1"} for ip, target in addrs],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def node(name: str, ip: str) -> dict:
    return {
        "kind": "Node", "apiVersion": "v1",
        "metadata": {"name": name, "uid": f"uid-node-{name}", "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": "10.0.1.0/24"},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]},
    }


def initial_objects() -> dict[str, list[dict]]:
    return {
        "/api/v1/pods": [
            pod("frontend-5d8f7c9b4-x2x9q", "production", "10.0.1.10",
                {"app": "frontend", "pod-template-hash": "5d8f7c9b4"}, ("ReplicaSet", "frontend-5d8f7c9b4"),
                sa="frontend"),
            pod("product-api-7c9d8f6b5-abcde", "production", "10.0.1.20",
                {"app": "product-api", "pod-template-hash": "7c9d8f6b5"}, ("ReplicaSet", "product-api-7c9d8f6b5")),
            pod("database-0", "production", "10.0.2.30", {"app": "database"}, ("StatefulSet", "database"),
                node="node-2"),
            pod("node-exporter-abc12", "monitoring", "10.0.0.11", {"app": "node-exporter"},
                ("DaemonSet", "node-exporter"), host_network=True),
            pod("report-28934520-zzz", "production", "10.0.1.99", {"app": "report"},
                ("Job", "report-28934520"), phase="Succeeded"),
        ],
        "/api/v1/services": [
            service("product-api", "production", "10.96.0.20", 80),
            service("kubernetes", "default", "10.96.0.1", 443),
        ],
        "/apis/discovery.k8s.io/v1/endpointslices": [
            endpoint_slice("product-api-8k2lm", "production", "product-api",
                           [("10.0.1.20", "product-api-7c9d8f6b5-abcde")]),
            endpoint_slice("kubernetes", "default", "kubernetes", [("10.0.0.11", None)]),
        ],
        "/api/v1/nodes": [node("node-1", "10.0.0.11"), node("node-2", "10.0.0.12")],
    }


# -- the fake API server ----------------------------------------------------------------------

class FakeKubeAPI:
    """Holds objects per path, a global resourceVersion counter and the event history."""

    def __init__(self, pki: dict[str, Path] | None, require_client_cert: bool = False) -> None:
        self.cond = threading.Condition()
        self.rv = 1000
        self.objects: dict[str, dict[str, dict]] = {p: {} for p in PATHS}
        self.history: dict[str, list[tuple[int, str, dict]]] = {p: [] for p in PATHS}
        self.compacted = 0                 # watches from a resourceVersion below this get 410
        self.gone_as_status = False        # 410 as an HTTP status instead of an ERROR event
        self.drop_generation = 0           # bump to cut every open watch stream
        self.fail_watches = 0              # the next N watch requests answer 500
        self.requests: list[tuple[str, dict]] = []
        self.bad_auth = 0
        for path, items in initial_objects().items():
            for obj in items:
                self._store(path, obj)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                fake.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if pki is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(pki["server.crt"], pki["server.key"])
            if require_client_cert:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(pki["ca.crt"])
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.require_client_cert = require_client_cert
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.drop()
        self.server.shutdown()
        self.server.server_close()

    # state changes ---------------------------------------------------------------
    def _store(self, path: str, obj: dict) -> dict:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[path][obj["metadata"]["uid"]] = obj
        return obj

    def event(self, path: str, kind: str, obj: dict) -> None:
        with self.cond:
            if kind == "DELETED":
                self.rv += 1
                obj = copy.deepcopy(self.objects[path].pop(obj["metadata"]["uid"]))
                obj["metadata"]["resourceVersion"] = str(self.rv)
            else:
                obj = self._store(path, obj)
            self.history[path].append((self.rv, kind, obj))
            self.cond.notify_all()

    def compact(self) -> None:
        with self.cond:
            self.compacted = self.rv + 1

    def drop(self) -> None:
        with self.cond:
            self.drop_generation += 1
            self.cond.notify_all()

    def count(self, path: str, watch: bool) -> int:
        return sum(1 for p, q in self.requests if p == path and ("watch" in q) == watch)

    # HTTP ---------------------------------------------------------------------
    def _json(self, h: BaseHTTPRequestHandler, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _status(self, h: BaseHTTPRequestHandler, code: int, reason: str, message: str) -> None:
        self._json(h, code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                             "message": message, "reason": reason, "code": code})

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.cond:
            self.requests.append((url.path, query))
        if not self.require_client_cert and h.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.bad_auth += 1
            return self._status(h, 401, "Unauthorized", "Unauthorized")
        if url.path not in PATHS:
            return self._status(h, 404, "NotFound", "the server could not find the requested resource")
        if query.get("watch") in ("1", "true"):
            return self._watch(h, url.path, query)
        kind, api_version = PATHS[url.path]
        with self.cond:
            items = sorted(self.objects[url.path].values(), key=lambda o: o["metadata"]["uid"])
            rv = str(self.rv)
        limit = int(query.get("limit", "0") or 0)
        start = int(query.get("continue", "0") or 0)
        page = items[start:start + limit] if limit else items
        meta = {"resourceVersion": rv}
        if limit and start + limit < len(items):
            meta["continue"] = str(start + limit)
        self._json(h, 200, {"kind": kind, "apiVersion": api_version, "metadata": meta, "items": page})

    def _chunk(self, h: BaseHTTPRequestHandler, data: bytes) -> None:
        h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        h.wfile.flush()

    def _watch(self, h: BaseHTTPRequestHandler, path: str, query: dict) -> None:
        since = int(query.get("resourceVersion") or 0)
        timeout = float(query.get("timeoutSeconds") or 30)
        with self.cond:
            if self.fail_watches > 0:
                self.fail_watches -= 1
                return self._status(h, 500, "InternalError", "etcd is sulking")
            gone = since < self.compacted
            generation = self.drop_generation
        if gone and self.gone_as_status:
            return self._status(h, 410, "Expired", f"too old resource version: {since} ({self.compacted})")
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        if gone:
            err = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                               "status": "Failure", "reason": "Expired", "code": 410,
                                               "message": f"too old resource version: {since}"}}
            self._chunk(h, json.dumps(err).encode() + b"\n")
            self._chunk(h, b"")
            return
        deadline = time.monotonic() + timeout
        sent = since
        while True:
            with self.cond:
                pending = [e for e in self.history[path] if e[0] > sent]
                if not pending:
                    self.cond.wait(0.05)
                    pending = [e for e in self.history[path] if e[0] > sent]
                dropped = self.drop_generation != generation
                current = self.rv
            if dropped:
                h.close_connection = True
                return  # cut without the final chunk: the client sees a broken stream
            for rv, kind, obj in pending:
                self._chunk(h, json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                sent = rv
            if time.monotonic() >= deadline:
                bookmark = {"type": "BOOKMARK", "object": {"kind": PATHS[path][0][:-4], "apiVersion":
                                                           PATHS[path][1], "metadata": {"resourceVersion":
                                                                                        str(current)}}}
                self._chunk(h, json.dumps(bookmark).encode() + b"\n")
                self._chunk(h, b"")
                return


# -- PKI --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"), server_names="IP:127.0.0.1,DNS:localhost")


@pytest.fixture()
def api(pki):
    server = FakeKubeAPI(pki)
    yield server
    server.close()


def _in_cluster(tmp_path: Path, api: FakeKubeAPI, pki, monkeypatch, **kube) -> Enricher:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(TOKEN + "\n")
    (sa / "ca.crt").write_bytes(pki["ca.crt"].read_bytes())
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
    config = parse(EnrichConfig, {
        "detect_host_ips": False,
        "rebuild_interval": 0,
        "kubernetes": {"service_account_dir": str(sa), "watch_timeout": 2, "request_timeout": 5,
                       "backoff_initial": "50ms", "backoff_max": "200ms", "page_size": 2, **kube},
    }, "agent.yaml", "enrich")
    return Enricher(config, node_name="node-1", metrics=Metrics())


def _until(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


CALL_CHAIN = [
    {"time": 1, "ip_src": "10.0.1.10", "ip_dst": "10.96.0.20", "l4_protocol": "TCP", "dst_port": 80},
    {"time": 2, "ip_src": "10.0.1.10", "ip_dst": "10.0.1.20", "l4_protocol": "TCP", "dst_port": 8080},
    {"time": 3, "ip_src": "10.0.1.20", "ip_dst": "10.0.2.30", "l4_protocol": "TCP", "dst_port": 5432},
    {"time": 4, "ip_src": "10.0.0.12", "ip_dst": "10.0.1.10", "l4_protocol": "TCP", "dst_port": 8080},
    {"time": 5, "ip_src": "10.0.1.10", "ip_dst": "10.0.0.11", "l4_protocol": "TCP", "dst_port": 6443},
    {"time": 6, "ip_src": "10.0.1.10", "ip_dst": "10.0.1.99", "l4_protocol": "TCP", "dst_port": 80},
]


def test_list_in_cluster_and_enrich(tmp_path, api, pki, monkeypatch) -> None:
    enricher = _in_cluster(tmp_path, api, pki, monkeypatch)
    enricher.start()
    try:
        assert enricher.wait_synced(15), "initial lists did not complete"
        out = enricher.enrich(flows_from_rows(CALL_CHAIN)).drop_columns(["time", "start_time"]).to_pydict()
    finally:
        enricher.stop()
    assert api.bad_auth == 0
    # paged lists: 5 pods with limit=2 → 3 requests
    assert api.count("/api/v1/pods", watch=False) == 3
    fe_labels = ["k8s:app=frontend", "k8s:io.cilium.k8s.policy.cluster=default",
                 "k8s:io.cilium.k8s.policy.serviceaccount=frontend", "k8s:io.kubernetes.pod.namespace=production"]
    assert out["src_labels"][0] == fe_labels
    assert out["src_identity"][0] == identity_for_labels(fe_labels)
    assert out["src_pod"][0] == "frontend-5d8f7c9b4-x2x9q"
    assert (out["src_workload"][0], out["src_workload_kind"][0]) == ("frontend", "Deployment")
    # the ClusterIP: the service, nothing else
    assert (out["dst_service"][0], out["dst_service_namespace"][0], out["dst_pod"][0]) == (
        "product-api", "production", None)
    # the backend pod: pod and its service (from the EndpointSlice)
    assert (out["dst_pod"][1], out["dst_service"][1], out["dst_workload"][1]) == (
        "product-api-7c9d8f6b5-abcde", "product-api", "product-api")
    assert (out["dst_pod"][2], out["dst_workload"][2], out["dst_workload_kind"][2]) == (
        "database-0", "database", "StatefulSet")
    assert (out["src_identity"][3], out["src_labels"][3]) == (6, ["reserved:remote-node"])
    # this node's InternalIP, also the API server's endpoint; the hostNetwork pod does not claim it
    assert (out["dst_identity"][4], out["dst_labels"][4]) == (1, ["reserved:host", "reserved:kube-apiserver"])
    # the Succeeded job pod gave its IP back
    assert (out["dst_identity"][5], out["dst_labels"][5]) == (2, ["reserved:world"])
    assert enricher.metrics.value("flowship_k8s_objects", resource="pods") == 3


def test_watch_events_410_and_reconnect(tmp_path, api, pki, monkeypatch) -> None:
    enricher = _in_cluster(tmp_path, api, pki, monkeypatch)
    state = enricher.state
    enricher.start()
    try:
        assert enricher.wait_synced(15)
        _until(lambda: api.count("/api/v1/pods", watch=True) >= 1, "the pod watch")

        # MODIFIED: product-api rolled out with a new label → new identity
        updated = pod("product-api-7c9d8f6b5-abcde", "production", "10.0.1.20",
                      {"app": "product-api", "version": "v2"}, ("ReplicaSet", "product-api-7c9d8f6b5"))
        gen = state.generation
        api.event("/api/v1/pods", "MODIFIED", updated)
        _until(lambda: state.generation > gen, "the MODIFIED event")
        info = enricher.index(force=True).lookup("10.0.1.20")
        assert "k8s:version=v2" in info.labels and info.service == "product-api"

        # ADDED + DELETED
        gen = state.generation
        api.event("/api/v1/pods", "ADDED", pod("checkout-6f7d9-q1w2e", "production", "10.0.1.40",
                                               {"app": "checkout"}, ("ReplicaSet", "checkout-6f7d9")))
        api.event("/api/v1/pods", "DELETED", {"metadata": {"uid": "uid-pod-production-database-0"}})
        _until(lambda: state.generation >= gen + 2, "ADDED and DELETED")
        index = enricher.index(force=True)
        assert index.lookup("10.0.1.40").workload == "checkout"
        assert index.lookup("10.0.2.30").labels == ("reserved:world",)

        # a dropped stream: resume from the last resourceVersion, no new list
        lists = api.count("/api/v1/pods", watch=False)
        last_rv = enricher.watcher.resource_versions["pods"]
        watches = api.count("/api/v1/pods", watch=True)
        api.drop()
        api.event("/api/v1/pods", "ADDED", pod("cart-5c4b3-zzzzz", "production", "10.0.1.41", {"app": "cart"},
                                               ("ReplicaSet", "cart-5c4b3")))
        _until(lambda: state.objects["pods"].get("uid-pod-production-cart-5c4b3-zzzzz") is not None,
               "the event sent while the stream was down")
        assert api.count("/api/v1/pods", watch=False) == lists
        resumed = [q for p, q in api.requests if p == "/api/v1/pods" and "watch" in q][watches:]
        assert resumed[0]["resourceVersion"] == last_rv
        assert enricher.metrics.value("flowship_k8s_watch_errors_total", resource="pods") >= 1

        # 410 Gone as an ERROR event: list again; a deletion missed meanwhile is picked up by the list
        relists = enricher.metrics.value("flowship_k8s_relists_total", resource="pods")
        with api.cond:
            api.rv += 1
            del api.objects["/api/v1/pods"]["uid-pod-production-checkout-6f7d9-q1w2e"]  # no event for it
        api.compact()
        api.drop()
        _until(lambda: enricher.metrics.value("flowship_k8s_relists_total", resource="pods") > relists, "relist")
        _until(lambda: "uid-pod-production-checkout-6f7d9-q1w2e" not in state.objects["pods"], "the relist result")
        assert api.count("/api/v1/pods", watch=False) > lists

        # 410 as an HTTP status, and 500s with backoff: still converges
        api.gone_as_status = True
        api.fail_watches = 2
        relists = enricher.metrics.value("flowship_k8s_relists_total", resource="pods")
        api.compact()
        api.drop()
        _until(lambda: enricher.metrics.value("flowship_k8s_relists_total", resource="pods") > relists,
               "relist after HTTP 410")
        api.event("/api/v1/pods", "ADDED", pod("late-1", "production", "10.0.1.42", {"app": "late"}, None))
        _until(lambda: "uid-pod-production-late-1" in state.objects["pods"], "events after the HTTP 410")
    finally:
        enricher.stop()
    for thread in enricher.watcher.threads:
        assert not thread.is_alive()


def test_kubeconfig_with_client_certificate(tmp_path, pki) -> None:
    api = FakeKubeAPI(pki, require_client_cert=True)
    try:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "c", "cluster": {
                "server": f"https://127.0.0.1:{api.port}",
                "certificate-authority-data": base64.b64encode(pki["ca.crt"].read_bytes()).decode()}}],
            "users": [{"name": "u", "user": {"client-certificate": str(pki["client.crt"]),
                                             "client-key-data": base64.b64encode(
                                                 pki["client.key"].read_bytes()).decode()}}],
            "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}],
        }))
        config = parse(EnrichConfig, {"detect_host_ips": False, "kubernetes": {
            "kubeconfig": str(kubeconfig), "resources": ["nodes"]}}, "agent.yaml", "enrich")
        enricher = Enricher(config, node_name="node-2", scratch_dir=str(tmp_path))
        enricher.start()
        try:
            assert enricher.wait_synced(15)
            assert enricher.lookup("10.0.0.12").labels == ("reserved:host",)
            assert enricher.lookup("10.0.0.11").labels == ("reserved:remote-node",)
        finally:
            enricher.stop()
        assert (tmp_path / "client.key").stat().st_mode & 0o777 == 0o600
    finally:
        api.close()


def test_credentials_errors(tmp_path) -> None:
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster_credentials(str(tmp_path), env={})
    with pytest.raises(KubeConfigError, match="token not found"):
        in_cluster_credentials(str(tmp_path), env={"KUBERNETES_SERVICE_HOST": "10.96.0.1",
                                                   "KUBERNETES_SERVICE_PORT": "443"})
    (tmp_path / "token").write_text("t")
    creds = in_cluster_credentials(str(tmp_path), env={"KUBERNETES_SERVICE_HOST": "fd00::1",
                                                       "KUBERNETES_SERVICE_PORT": "443"})
    assert creds.server == "https://[fd00::1]:443" and creds.bearer() == "t" and creds.ca_file is None
    kc = tmp_path / "kc.yaml"
    kc.write_text("apiVersion: v1\ncurrent-context: x\nclusters: [{name: c, cluster: {server: 'https://k:6443'}}]\n"
                  "users: [{name: u, user: {exec: {command: aws}}}]\ncontexts: [{name: x, context: {cluster: c, "
                  "user: u}}]\n")
    with pytest.raises(KubeConfigError, match="exec/auth-provider"):
        kubeconfig_credentials(str(kc))
    kc.write_text("apiVersion: v1\ncurrent-context: x\nclusters: [{name: c, cluster: {server: 'https://k:6443', "
                  "insecure-skip-tls-verify: true}}]\nusers: [{name: u, user: {token: abc}}]\n"
                  "contexts: [{name: x, context: {cluster: c, user: u}}]\n")
    creds = kubeconfig_credentials(str(kc))
    assert (creds.server, creds.verify, creds.bearer()) == ("https://k:6443", False, "abc")
    with pytest.raises(KubeConfigError, match="context 'nope' not found"):
        kubeconfig_credentials(str(kc), context="nope")
