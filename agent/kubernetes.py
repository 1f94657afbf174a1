"""Kubernetes API access for enrichment: list and watch over plain HTTP, no client library.

* credentials — in-cluster service account (token re-read on every request, CA,
  KUBERNETES_SERVICE_HOST/PORT) or a kubeconfig file (token, token file, client
  certificate, ``*-data`` fields, ``insecure-skip-tls-verify``);
* :class:`KubeClient` — paged lists and chunked watch streams with ``requests``;
* :class:`KubeWatcher` — one thread per resource: list, then watch from the
  list's resourceVersion, a fresh list on ``410 Gone``, reconnects with
  exponential backoff; what it sees goes to an :class:`ObjectStore`
  (``flowship.agent.enrich.KubeState``).
"""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import requests
import structlog
import yaml

from flowship.config import Duration
from flowship.metrics import Metrics

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

RESOURCES: dict[str, str] = {
    "pods": "/api/v1/pods",
    "services": "/api/v1/services",
    "endpointslices": "/apis/discovery.k8s.io/v1/endpointslices",
    "nodes": "/api/v1/nodes",
}
Resource = Literal["pods", "services", "endpointslices", "nodes"]

# Labels that change with every rollout or pod; Cilium leaves them out of identities too.
DEFAULT_EXCLUDED_LABELS: tuple[str, ...] = (
    "pod-template-hash", "controller-revision-hash", "pod-template-generation",
    "statefulset.kubernetes.io/pod-name", "apps.kubernetes.io/pod-index", "controller-uid",
    "batch.kubernetes.io/controller-uid", "batch.kubernetes.io/job-completion-index", "job-name",
    "batch.kubernetes.io/job-name",
)


@dataclass
class KubernetesConfig:
    """``enrich.kubernetes``: where the API server is and what to watch."""

    enabled: bool = True
    kubeconfig: str | None = None          # a kubeconfig file; none means in-cluster service account
    context: str | None = None             # kubeconfig context (default: current-context)
    service_account_dir: str = SERVICE_ACCOUNT_DIR
    resources: list[Resource] = field(default_factory=lambda: list(RESOURCES))
    watch_timeout: Duration = Duration(300.0)    # server-side timeoutSeconds of one watch
    request_timeout: Duration = Duration(30.0)   # connect/read timeout of list requests
    backoff_initial: Duration = Duration(1.0)
    backoff_max: Duration = Duration(30.0)
    page_size: int = 500
    exclude_labels: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDED_LABELS))
    kube_apiserver: bool = True            # label endpoints of default/kubernetes reserved:kube-apiserver

    def validate(self) -> list[str]:
        problems = []
        if self.kubeconfig is not None and not Path(self.kubeconfig).expanduser().is_file():
            problems.append(f"kubeconfig: file not found: {self.kubeconfig}")
        if self.page_size < 1:
            problems.append(f"page_size: expected an integer >= 1, got {self.page_size}")
        return problems



class ObjectStore(Protocol):
    """Where a watcher puts what it lists and watches."""

    synced: set[str]

    def replace(self, resource: str, items: list[dict]) -> None: ...

    def apply(self, resource: str, event_type: str, obj: dict) -> None: ...


class KubeConfigError(ValueError):
    """Credentials or server address could not be worked out."""


@dataclass
class KubeCredentials:
    server: str
    ca_file: str | None = None
    verify: bool = True
    token: str | None = field(default=None, repr=False)  # never printed
    token_file: str | None = None     # re-read on every request: projected tokens rotate
    client_cert: str | None = None
    client_key: str | None = None

    def bearer(self) -> str | None:
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip()
            except OSError:
                return self.token
        return self.token


def in_cluster_credentials(sa_dir: str = SERVICE_ACCOUNT_DIR, env: dict[str, str] | None = None) -> KubeCredentials:
    """Service-account token and CA, and KUBERNETES_SERVICE_HOST/PORT."""
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeConfigError("not running in a cluster: KUBERNETES_SERVICE_HOST/PORT are not set "
                              "(set enrich.kubernetes.kubeconfig to use a kubeconfig file)")
    token_file = Path(sa_dir) / "token"
    if not token_file.is_file():
        raise KubeConfigError(f"service account token not found: {token_file}")
    ca = Path(sa_dir) / "ca.crt"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return KubeCredentials(server=f"https://{host}:{port}", ca_file=str(ca) if ca.is_file() else None,
                           token_file=str(token_file))


def _data_file(data_b64: str, directory: str, name: str) -> str:
    """Write ``*-data`` (base64) of a kubeconfig to a private file: requests wants paths."""
    path = Path(directory) / name
    path.write_bytes(base64.b64decode(data_b64))
    path.chmod(0o600)
    return str(path)


def kubeconfig_credentials(path: str, context: str | None = None, scratch_dir: str | None = None) -> KubeCredentials:
    """Server, CA and token or client certificate from a kubeconfig file."""
    path = str(Path(path).expanduser())
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise KubeConfigError(f"{path}: cannot read kubeconfig: {exc}") from None
    base = Path(path).parent

    def named(section: str, name: str) -> dict:
        for item in doc.get(section) or []:
            if item.get("name") == name:
                return item.get(section[:-1]) or {}
        raise KubeConfigError(f"{path}: {section[:-1]} {name!r} not found")

    ctx_name = context or doc.get("current-context")
    if not ctx_name:
        raise KubeConfigError(f"{path}: no current-context; set enrich.kubernetes.context")
    ctx = named("contexts", ctx_name)
    cluster = named("clusters", ctx.get("cluster", ""))
    user = named("users", ctx["user"]) if ctx.get("user") else {}
    if "exec" in user or "auth-provider" in user:
        raise KubeConfigError(f"{path}: user {ctx.get('user')!r} uses an exec/auth-provider plugin, which is "
                              "not supported; use a token or a client certificate")
    scratch = scratch_dir or tempfile.mkdtemp(prefix="flowship-kube-")

    def file_or_data(section: dict, key: str, name: str) -> str | None:
        if section.get(f"{key}-data"):
            return _data_file(section[f"{key}-data"], scratch, name)
        if section.get(key):
            return str((base / section[key]).expanduser())
        return None

    server = cluster.get("server")
    if not server:
        raise KubeConfigError(f"{path}: cluster {ctx.get('cluster')!r} has no server")
    token_file = user.get("tokenFile")
    return KubeCredentials(
        server=server.rstrip("/"),
        ca_file=file_or_data(cluster, "certificate-authority", "ca.crt"),
        verify=not cluster.get("insecure-skip-tls-verify", False),
        token=user.get("token"),
        token_file=str((base / token_file).expanduser()) if token_file else None,
        client_cert=file_or_data(user, "client-certificate", "client.crt"),
        client_key=file_or_data(user, "client-key", "client.key"),
    )


class KubeAPIError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"HTTP {status}: {message}")


class KubeClient:
    """List and watch over HTTP(S) with bearer token or client certificate."""

    def __init__(self, creds: KubeCredentials, request_timeout: float = 30.0) -> None:
        self.creds = creds
        self.timeout = request_timeout
        self.session = requests.Session()
        # Passed on every request: a per-request value wins over REQUESTS_CA_BUNDLE and friends,
        # which would otherwise replace the cluster's CA.
        self.verify: bool | str = (creds.ca_file or True) if creds.verify else False
        self.cert: tuple[str, str] | str | None = None
        if creds.client_cert:
            self.cert = (creds.client_cert, creds.client_key) if creds.client_key else creds.client_cert
        self.session.headers["Accept"] = "application/json"
        self.session.headers["User-Agent"] = "flowship-agent"

    def _headers(self) -> dict[str, str]:
        token = self.creds.bearer()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def list(self, path: str, page_size: int = 500) -> tuple[list[dict], str]:
        """All items (following ``continue``) and the list's resourceVersion."""
        items: list[dict] = []
        params: dict[str, Any] = {"limit": page_size}
        while True:
            resp = self.session.get(self.creds.server + path, params=params, headers=self._headers(),
                                    timeout=self.timeout, verify=self.verify, cert=self.cert)
            if resp.status_code != 200:
                raise KubeAPIError(resp.status_code, resp.text[:300])
            body = resp.json()
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            if not meta.get("continue"):
                return items, str(meta.get("resourceVersion", ""))
            params = {"limit": page_size, "continue": meta["continue"]}

    def watch(self, path: str, resource_version: str, timeout_s: int,
              on_response: Callable[[requests.Response | None], None] | None = None) -> Iterator[dict]:
        """Watch events (dicts with ``type`` and ``object``) until the server ends the stream."""
        params = {"watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_s)}
        resp = self.session.get(self.creds.server + path, params=params, headers=self._headers(), stream=True,
                                timeout=(self.timeout, timeout_s + self.timeout), verify=self.verify, cert=self.cert)
        if on_response is not None:
            on_response(resp)
        try:
            if resp.status_code != 200:
                raise KubeAPIError(resp.status_code, resp.text[:300])
            for line in resp.iter_lines(chunk_size=None):
                if line:
                    yield json.loads(line)
        finally:
            resp.close()
            if on_response is not None:
                on_response(None)


def _abort(resp: requests.Response) -> None:
    """Unblock a thread reading a watch stream.

    ``resp.close()`` from another thread waits for the reader's buffer lock,
    that is for the next event; shutting the socket down ends the read at once.
    """
    sock = getattr(getattr(resp.raw, "_connection", None), "sock", None)
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the fd only, also for an SSL socket
    except OSError:
        pass


class _GoneError(Exception):
    """The resourceVersion is too old: list again."""


class KubeWatcher:
    """One thread per resource: list, then watch from the list's resourceVersion.

    410 Gone (as a status or an ERROR event) → list again. Any other failure →
    wait (exponential backoff with jitter, capped) and watch again from the
    last resourceVersion seen; after a failed list, list again.
    """

    def __init__(self, client: KubeClient, state: ObjectStore, config: KubernetesConfig,
                 metrics: Metrics | None = None, log: Any = None) -> None:
        self.client = client
        self.state = state
        self.config = config
        self.metrics = metrics
        self.log = log or structlog.get_logger().bind(component="enrich.kubernetes")
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self._responses: dict[str, requests.Response] = {}
        self._lock = threading.Lock()
        self.relists: dict[str, int] = dict.fromkeys(config.resources, 0)
        self.resource_versions: dict[str, str] = {}

    def _count(self, name: str, doc: str, **labels: str) -> None:
        if self.metrics is not None:
            self.metrics.counter(name, doc, list(labels)).labels(*labels.values()).inc()

    def start(self) -> None:
        for resource in self.config.resources:
            t = threading.Thread(target=self._run, args=(resource,), name=f"k8s-watch-{resource}", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        with self._lock:
            for resp in list(self._responses.values()):
                _abort(resp)
        for t in self.threads:
            t.join(timeout)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if set(self.config.resources) <= self.state.synced:
                return True
            time.sleep(0.02)
        return False

    def _track(self, resource: str) -> Callable[[requests.Response | None], None]:
        def track(resp: requests.Response | None) -> None:
            with self._lock:
                if resp is None:
                    self._responses.pop(resource, None)
                else:
                    self._responses[resource] = resp
            if resp is not None and self.stop_event.is_set():
                _abort(resp)
        return track

    def _run(self, resource: str) -> None:
        path = RESOURCES[resource]
        delay = float(self.config.backoff_initial)
        while not self.stop_event.is_set():
            try:
                if resource not in self.resource_versions:
                    items, rv = self.client.list(path, self.config.page_size)
                    self.state.replace(resource, items)
                    self.relists[resource] += 1
                    self._count("flowship_k8s_lists_total", "Kubernetes list requests completed.",
                                resource=resource)
                    self.resource_versions[resource] = rv
                # resumes from the last resourceVersion seen, also after a broken stream
                self._watch(resource, path, self.resource_versions[resource])
                delay = float(self.config.backoff_initial)  # a watch that ended normally: reset
                continue
            except _GoneError:
                self.log.info("k8s watch expired, listing again", resource=resource)
                self._count("flowship_k8s_relists_total", "Lists repeated after 410 Gone.", resource=resource)
                self.resource_versions.pop(resource, None)
                continue
            except Exception as exc:  # noqa: BLE001 - network, HTTP, JSON: retry them all
                if self.stop_event.is_set():
                    return
                self._count("flowship_k8s_watch_errors_total", "Failed Kubernetes list/watch requests.",
                            resource=resource)
                self.log.warning("k8s list/watch failed, retrying", resource=resource, error=str(exc),
                                 retry_in_s=round(delay, 2))
            self.stop_event.wait(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, float(self.config.backoff_max))

    def _watch(self, resource: str, path: str, rv: str) -> str:
        try:
            for event in self.client.watch(path, rv, int(self.config.watch_timeout), self._track(resource)):
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _GoneError()
                    raise KubeAPIError(int(obj.get("code") or 0), str(obj.get("message")))
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.state.apply(resource, kind, obj)
                    self._count("flowship_k8s_watch_events_total", "Kubernetes watch events applied.",
                                resource=resource, type=kind)
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if new_rv:  # BOOKMARK events carry only this
                    rv = new_rv
                    self.resource_versions[resource] = rv
        except KubeAPIError as exc:
            if exc.status == 410:
                raise _GoneError() from None
            raise
        return rv
