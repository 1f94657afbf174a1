"""A small service topology in network namespaces: the seed's frontend → product-api → database chain.

Used by the namespace tests and ``flowship demo``. Layout (all inside namespaces this module creates,
nothing on the host's own interfaces):

    node namespace (the "node"): bridge br0 10.99.0.1/24, host-side veths v-frontend, v-api, v-db, v-dns
    frontend     10.99.0.10   client: HTTP keep-alive and new connections, kube-probe /healthz, DNS
    product-api  10.99.0.20   HTTP/1.1 server :8080 — /products/fast, /products/slow (sleeps), /products/fail
                              (503), /healthz; calls the database once per /products request
    database     10.99.0.30   HTTP server :5000 (/query), and an nftables rule dropping TCP :6432
    dns          10.99.0.53   dnsmasq: db.production.svc → 10.99.0.30, other *.production.svc → NXDOMAIN

Every process started here runs in a namespace and is stopped (by its own pid) by :meth:`close`, which
also deletes the namespaces; the veths and the bridge go with them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.99.0"
NODE_IP = f"{SUBNET}.1"


@dataclass(frozen=True)
class Pod:
    name: str
    ip: str
    host_if: str  # the host-side veth in the node namespace


PODS = (
    Pod("frontend", f"{SUBNET}.10", "v-frontend"),
    Pod("product-api", f"{SUBNET}.20", "v-api"),
    Pod("database", f"{SUBNET}.30", "v-db"),
    Pod("dns", f"{SUBNET}.53", "v-dns"),
)
API_PORT, DB_PORT, DENIED_PORT, DNS_PORT = 8080, 5000, 6432, 53
DNS_NAME, DNS_MISSING = "db.production.svc", "missing.production.svc"
SLOW_SECONDS, DB_SECONDS = 0.2, 0.01
TOOLS = {"ip": "iproute2", "nft": "nftables", "dnsmasq": "dnsmasq-base"}
# Multiplies the waits below: in an emulated VM (tests/vm, QEMU without KVM) Python starts ~10x slower.
TIME_SCALE = float(os.environ.get("FLOWSHIP_TEST_TIME_SCALE", "1"))

DB_SERVER = r"""
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        time.sleep(float(sys.argv[3]))
        body = b'{"rows": 1}'
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
s = ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H); print("ready", flush=True); s.serve_forever()
"""

API_SERVER = r"""
import http.client, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
host, port, db_host, db_port, slow = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/healthz":
            return self.reply(200, b"ok")
        c = http.client.HTTPConnection(db_host, db_port, timeout=10)
        c.request("GET", "/query?for=" + self.path.rsplit("/", 1)[-1]); c.getresponse().read(); c.close()
        if self.path.endswith("/slow"):
            time.sleep(slow)
        if self.path.endswith("/fail"):
            return self.reply(503, b"unavailable")
        self.reply(200, b'{"product": 123}')
    def reply(self, code, body):
        self.send_response(code); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
s = ThreadingHTTPServer((host, port), H); print("ready", flush=True); s.serve_forever()
"""

FRONTEND_CLIENT = r"""
import http.client, json, socket, struct, sys, time
api, port, dns, denied_host, denied_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
names = sys.argv[6].split(",")
out = {"keepalive": [], "single": [], "probe": None, "dns": [], "denied": None}
c = http.client.HTTPConnection(api, port, timeout=10)
c.connect(); out["keepalive_port"] = c.sock.getsockname()[1]
for path in ("/products/fast", "/products/slow", "/products/fail"):
    c.request("GET", path, headers={"User-Agent": "frontend/1.0", "X-Request-Id": "req" + path.replace("/", "-")})
    r = c.getresponse(); r.read(); out["keepalive"].append([path, r.status])
c.close()
for path in ("/products/fast", "/products/slow", "/products/fail"):
    c = http.client.HTTPConnection(api, port, timeout=10); c.connect()
    sport = c.sock.getsockname()[1]
    c.request("GET", path, headers={"User-Agent": "frontend/1.0"}); r = c.getresponse(); r.read(); c.close()
    out["single"].append([path, r.status, sport])
c = http.client.HTTPConnection(api, port, timeout=10); c.connect(); sport = c.sock.getsockname()[1]
c.request("GET", "/healthz", headers={"User-Agent": "kube-probe/1.29"}); r = c.getresponse(); r.read(); c.close()
out["probe"] = ["/healthz", r.status, sport]
for i, name in enumerate(names):
    q = struct.pack(">HHHHHH", 0x4000 + i, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); s.bind(("0.0.0.0", 0))
    s.sendto(q, (dns, 53)); d = s.recv(512)
    out["dns"].append([name, s.getsockname()[1], d[3] & 15]); s.close()
s = socket.socket(); s.settimeout(1.5); s.bind(("0.0.0.0", 0)); dport = s.getsockname()[1]
try:
    s.connect((denied_host, denied_port)); outcome = "connected"
except OSError as e:
    outcome = type(e).__name__
out["denied"] = [dport, outcome]; s.close()
print(json.dumps(out), flush=True)
"""


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout * TIME_SCALE)


def missing_tools() -> list[str]:
    return [f"{tool} (apt-get install {pkg})" for tool, pkg in TOOLS.items() if not shutil.which(tool)]


@dataclass
class Topology:
    """The namespaces and processes of one topology instance; :meth:`close` removes all of it."""

    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000:05d}")
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    created: list[str] = field(default_factory=list)

    @property
    def node(self) -> str:
        return f"fs-node-{self.tag}"

    def ns(self, pod: str) -> str:
        return f"fs-{pod}-{self.tag}"

    def pod(self, name: str) -> Pod:
        return next(p for p in PODS if p.name == name)

    @property
    def interfaces(self) -> list[str]:
        return [p.host_if for p in PODS]

    # -- building -------------------------------------------------------------------------------

    def create(self) -> Topology:
        """Namespaces, bridge, veths, addresses, routes; waits until every pod reaches every other."""
        missing = missing_tools()
        if missing:
            raise RuntimeError("missing tools for the namespace topology: " + ", ".join(missing))
        try:
            self._add_ns(self.node)
            sh("ip", "-n", self.node, "link", "set", "lo", "up")
            sh("ip", "-n", self.node, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.node, "addr", "add", f"{NODE_IP}/24", "dev", "br0")
            sh("ip", "-n", self.node, "link", "set", "br0", "up")
            for p in PODS:
                ns = self.ns(p.name)
                self._add_ns(ns)
                sh("ip", "-n", self.node, "link", "add", p.host_if, "type", "veth", "peer", "name", "eth0",
                   "netns", ns)
                sh("ip", "-n", self.node, "link", "set", p.host_if, "master", "br0", "up")
                sh("ip", "-n", ns, "addr", "add", f"{p.ip}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
                sh("ip", "-n", ns, "route", "add", "default", "via", NODE_IP)
            self.wait_reachable()
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.created.append(ns)

    def wait_reachable(self, timeout: float = 20.0) -> None:
        """Ping every pod from the frontend and the node until all answer (links up, neighbours known)."""
        deadline = time.monotonic() + timeout * TIME_SCALE
        for src in (self.ns("frontend"), self.ns("product-api"), self.node):
            for p in PODS:
                while sh("ip", "netns", "exec", src, "ping", "-c", "1", "-W", "1", p.ip, check=False).returncode:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{p.ip} unreachable from {src}")
                    time.sleep(0.2)

    # -- processes ------------------------------------------------------------------------------

    def spawn(self, ns: str, *cmd: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        self.procs.append(proc)
        return proc

    def python(self, ns: str, code: str, *args: object) -> subprocess.Popen[str]:
        return self.spawn(ns, sys.executable, "-c", code, *map(str, args))

    @staticmethod
    def wait_ready(proc: subprocess.Popen[str], what: str) -> None:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
            raise RuntimeError(f"{what} did not start: {line!r} {err}")

    def start_services(self) -> None:
        """The database and product-api HTTP servers, dnsmasq and the nftables drop rule."""
        db, api, dns = self.pod("database"), self.pod("product-api"), self.pod("dns")
        self.wait_ready(self.python(self.ns("database"), DB_SERVER, db.ip, DB_PORT, DB_SECONDS), "database server")
        self.wait_ready(self.python(self.ns("product-api"), API_SERVER, api.ip, API_PORT, db.ip, DB_PORT,
                                    SLOW_SECONDS), "product-api server")
        proc = self.spawn(self.ns("dns"), "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                          "--conf-file=/dev/null", f"--listen-address={dns.ip}", "--bind-interfaces",
                          f"--port={DNS_PORT}", f"--address=/{DNS_NAME}/{db.ip}", "--local=/production.svc/",
                          "--pid-file=", "--user=root", "--log-facility=-")
        deadline = time.monotonic() + 10 * TIME_SCALE
        while not self._dns_answers(dns.ip):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq did not start: {proc.stderr.read() if proc.poll() is not None else ''}")
            time.sleep(0.1)
        rules = ("add table inet flowship_test\n"
                 "add chain inet flowship_test input { type filter hook input priority 0; policy accept; }\n"
                 f"add rule inet flowship_test input tcp dport {DENIED_PORT} drop\n")
        subprocess.run(["ip", "netns", "exec", self.ns("database"), "nft", "-f", "-"], input=rules, text=True,
                       check=True, capture_output=True)

    def _dns_answers(self, ip: str) -> bool:
        probe = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(0.5)\n"
                 "s.sendto(bytes.fromhex('000101000001000000000000000001000001'),(sys.argv[1],53))\n"
                 "try:\n s.recv(512)\nexcept OSError:\n sys.exit(1)\n")
        return sh("ip", "netns", "exec", self.ns("frontend"), sys.executable, "-c", probe, ip,
                  check=False).returncode == 0

    def run_frontend(self, timeout: float = 60) -> dict:
        """The frontend's scripted traffic; returns what it did (client ports, statuses, DNS rcodes)."""
        api, dns, db = self.pod("product-api"), self.pod("dns"), self.pod("database")
        proc = self.python(self.ns("frontend"), FRONTEND_CLIENT, api.ip, API_PORT, dns.ip, db.ip, DENIED_PORT,
                           f"{DNS_NAME},{DNS_MISSING}")
        out, err = proc.communicate(timeout=timeout * TIME_SCALE)
        if proc.returncode:
            raise RuntimeError(f"frontend client failed: {err}")
        return json.loads(out)

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.procs.clear()
        for ns in reversed(self.created):
            sh("ip", "netns", "del", ns, check=False)
        self.created.clear()

    def __enter__(self) -> Topology:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()


def netns_exists(name: str) -> bool:
    return Path(f"/run/netns/{name}").exists()
