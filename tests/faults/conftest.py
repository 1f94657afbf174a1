"""Fixtures of the fault tests: servers of their own, generated inputs.

The fault tests stop and restart Kafka, OpenSearch and VictoriaLogs, so they
run their own instances (``deploy/dev/servers`` with a private
``FLOWSHIP_RUN`` and ports 21092/21093/21200/21300/21428 — or the same ports
in 22xxx, 23xxx... when another test run holds those — or the five ports in
``FLOWSHIP_FAULTS_PORTS``), started once per session and stopped at its end.
The shared development servers on the default ports are never touched.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from faultlib import FaultServers, generate_input, port_in_use  # noqa: E402

PORT_OFFSETS = (92, 93, 200, 300, 428)  # kafka, controller, opensearch, transport, victorialogs
PORT_BASES = (21000, 22000, 23000, 24000, 25000, 26000)  # below the ephemeral range
LARGEST_INPUT = 200_000
NAMES = ("kafka", "kafka_controller", "opensearch", "opensearch_transport", "victorialogs")


def choose_ports() -> dict[str, int]:
    raw = os.environ.get("FLOWSHIP_FAULTS_PORTS")
    if raw:
        try:
            ports = dict(zip(NAMES, (int(p) for p in raw.split(",")), strict=True))
        except ValueError:
            pytest.fail(f"FLOWSHIP_FAULTS_PORTS={raw!r}: expected five ports: kafka,controller,opensearch,"
                        "transport,victorialogs", pytrace=False)
        busy = [f"{name} {port}" for name, port in ports.items() if port_in_use(port)]
        if busy:
            pytest.fail(f"FLOWSHIP_FAULTS_PORTS are in use ({', '.join(busy)})", pytrace=False)
        return ports
    for base in PORT_BASES:
        ports = {name: base + off for name, off in zip(NAMES, PORT_OFFSETS, strict=True)}
        if not any(port_in_use(p) for p in ports.values()):
            return ports
    pytest.fail(f"no free set of ports for the fault tests' own servers in {PORT_BASES} (+{PORT_OFFSETS}): "
                "stop other test runs or choose ports with FLOWSHIP_FAULTS_PORTS=kafka,controller,opensearch,"
                "transport,victorialogs", pytrace=False)


@pytest.fixture(scope="session")
def fault_servers(tmp_path_factory: pytest.TempPathFactory):
    ports = choose_ports()
    run_dir = tmp_path_factory.mktemp("fault-servers")
    servers = FaultServers(run_dir, ports)
    try:
        servers.start()
        yield servers
    finally:
        servers._servers("stop", timeout=180)
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def _largest_input(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("fault-input") / f"flows-{LARGEST_INPUT}.jsonl"
    return path, generate_input(path, LARGEST_INPUT)


@pytest.fixture(scope="session")
def flows_input(_largest_input, tmp_path_factory: pytest.TempPathFactory):
    """``flows_input(n)`` -> (path of n generated Hubble JSON lines, their uuids in line order)."""
    made: dict[int, tuple[Path, list[str]]] = {LARGEST_INPUT: _largest_input}

    def make(n: int) -> tuple[Path, list[str]]:
        if n not in made:
            assert n <= LARGEST_INPUT
            big, uuids = _largest_input
            path = tmp_path_factory.mktemp("fault-input") / f"flows-{n}.jsonl"
            with open(big, "rb") as src, open(path, "wb") as dst:
                for _ in range(n):
                    dst.write(src.readline())
            made[n] = (path, uuids[:n])
        return made[n]

    return make
