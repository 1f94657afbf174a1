"""A walk through every command of the README's shell blocks, run the way a new user runs them.

``WALK`` says for each command how this test runs it: as written (in one working directory, in the README's
order, so ``./flows`` is what the earlier commands wrote), with a substitution the entry names (an address or a
file only a cluster has), or which test already runs it. A README command without an entry fails the test, so
the README cannot promise a command nobody runs.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from gotools import go_tool

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sinks"))

import devservers  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Step:
    how: str  # "as written", "substituted: <what and why>", or "covered by <test id>"


WALK: dict[str, Step] = {
    "bash deploy/dev/setup && flowship agent": Step("substituted: the agent stops after --duration 3s"),
    "bash deploy/dev/test": Step("covered by this very run (deploy/dev/test runs this test)"),
    "flowship export < flows.json.gz": Step("as written (flows.json.gz: the recorded Hubble flows, gzipped)"),
    "python3 -c \"import duckdb; duckdb.sql(\\\"select verdict, count(*) from read_parquet("
    "'flows/flows/**/*.parquet', hive_partitioning=true) group by 1\\\").show()\"": Step("as written"),
    "flowship validate configs/hubble-relay-full.yaml": Step("as written"),
    "flowship export --config configs/hubble-files-to-parquet.yaml": Step(
        "substituted: the config's Hubble exporter files (/var/run/cilium/hubble/events*.log, on a Cilium node) "
        "are files of recorded flows here; it follows them, so it is stopped with SIGTERM once Parquet is written"),
    "hubble observe -o jsonpb --follow | flowship export": Step(
        "substituted: the real hubble CLI reads recorded flows with --input-file instead of a live server, "
        "without --follow so that it ends"),
    "flowship agent --config configs/cluster-agent-to-kafka.yaml": Step(
        "substituted: the brokers are the dev Kafka, NODE_NAME is set, Kubernetes enrichment is off (no API "
        "server), and it stops after --duration 3s"),
    "flowship demo": Step("covered by tests/agent/test_demo.py::test_demo_prints_latency_per_hop_and_the_dropped_calls"),
    "flowship report all --parquet ./flows": Step("as written"),
    "flowship report drops --since 1h --namespace production": Step("as written"),
    "flowship compact ./flows --retention 30d": Step("as written"),
    "flowship history --archive ./flows": Step("as written (in the background, stopped with SIGTERM)"),
    "hubble observe --server 127.0.0.1:4255 --since 24h -n production --verdict DROPPED": Step(
        "as written, with the real hubble CLI (built by deploy/dev/build-hubble-cli) as `hubble`"),
    "flowship --version": Step("as written"),
    "helm install flowship deploy/helm/flowship -n flowship --create-namespace -f "
    "deploy/helm/flowship/examples/kafka-to-opensearch.yaml": Step(
        "covered by tests/integration/test_helm_chart.py::test_every_rendered_object_decodes_strictly (no cluster "
        "here: helm template of the same values, every object decoded strictly)"),
    "kubectl apply -f deploy/kubernetes/flowship.yaml": Step(
        "covered by tests/integration/test_helm_chart.py::test_committed_manifests_are_a_fresh_render"),
}


def readme_commands() -> list[str]:
    """Every command line of the README's ``sh`` blocks, trailing comments removed."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_every_readme_command_has_a_walk_entry():
    commands = readme_commands()
    assert set(commands) == set(WALK), (f"README commands without a walk entry: {sorted(set(commands) - set(WALK))}; "
                                        f"entries for commands the README no longer has: {sorted(set(WALK) - set(commands))}")
    for command, step in WALK.items():
        if step.how.startswith("covered by ") and "::" in step.how:
            path, name = step.how.removeprefix("covered by ").split(" ")[0].split("::")
            assert f"def {name}(" in (REPO / path).read_text(), f"{command}: {step.how} does not exist"


def sh(command: str, cwd: Path, timeout: float = 300, stdin: bytes | None = None,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The command through a shell, as a user types it, with the installed ``flowship`` on PATH."""
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, input=stdin, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return proc


def ok(proc: subprocess.CompletedProcess, command: str) -> str:
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{out[-2000:]}\n{err[-3000:]}"
    return out


@pytest.mark.kernel
def test_walk_through_the_readme(tmp_path: Path, fixture_files: list[Path], kafka_server_address: str):
    if os.geteuid() != 0:
        pytest.fail("the README's main job runs the eBPF agent: run the tests as root")
    for tool in ("flowship", "python3", "bash"):
        assert subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True).returncode == 0, \
            f"{tool} is not on PATH: run `bash deploy/dev/setup` first"
    work = tmp_path / "user"
    work.mkdir()
    recorded = b"".join(p.read_bytes() for p in fixture_files)

    # The main job: setup (idempotent: a second run only checks), then the agent on its embedded default.
    command = "bash deploy/dev/setup && flowship agent"
    ok(sh(f"cd {shlex.quote(str(REPO))} && bash deploy/dev/setup", work, timeout=1800), command)
    out = sh("flowship --log-format json agent --duration 3s --no-progress", work, timeout=180)
    ok(out, command)
    assert b"no --config given: running the embedded default agent config" in out.stderr
    assert b'"agent capturing"' in out.stderr

    # Flows of a gzip file on stdin, into ./flows (export's embedded default).
    (work / "flows.json.gz").write_bytes(gzip.compress(recorded))
    ok(sh("flowship export < flows.json.gz", work), "flowship export < flows.json.gz")
    duck = next(c for c in WALK if c.startswith("python3 -c"))
    table = ok(sh(duck, work), duck)
    assert "verdict" in table and "FORWARDED" in table and "DROPPED" in table

    ok(sh("flowship validate configs/hubble-relay-full.yaml", REPO), "flowship validate configs/hubble-relay-full.yaml")

    # Hubble exporter files, followed: the same config with the files of a Cilium node replaced.
    config = yaml.safe_load((REPO / "configs" / "hubble-files-to-parquet.yaml").read_text())
    live, rotated = work / "hubble" / "events.log", work / "hubble" / "events-1.log"
    live.parent.mkdir()
    rotated.write_bytes(recorded)
    live.write_bytes(recorded[: recorded.index(b"\n") + 1])
    config["sources"][0]["paths"] = [str(live), str(work / "hubble" / "events-*.log")]
    config["sinks"][0]["path"] = str(work / "hubble-parquet")
    config["sinks"][0]["max_file_age"] = "1s"
    config["data_dir"] = str(work / "hubble-state")
    (work / "hubble-files.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.Popen(["bash", "-c", "exec flowship export --config hubble-files.yaml --no-progress"], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((work / "hubble-parquet").rglob("*.parquet")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert list((work / "hubble-parquet").rglob("*.parquet")), "no Parquet from the followed Hubble files"

    # hubble observe into flowship export: the real CLI, reading recorded flows instead of a server.
    hubble = go_tool("build-hubble-cli")
    (work / "observe").mkdir()
    (work / "observe" / "recorded.jsonl").write_bytes(recorded)
    command = f"{shlex.quote(hubble)} observe --input-file recorded.jsonl -o jsonpb | flowship export"
    ok(sh(command, work / "observe"), "hubble observe -o jsonpb --follow | flowship export")
    assert list((work / "observe" / "flows").rglob("*.parquet"))

    # The DaemonSet config, against the dev Kafka.
    agent = yaml.safe_load((REPO / "configs" / "cluster-agent-to-kafka.yaml").read_text())
    agent["sources"][0].pop("enrich", None)
    agent["sinks"][0]["brokers"] = kafka_server_address
    agent["data_dir"] = str(work / "agent-state")
    (work / "cluster-agent.yaml").write_text(yaml.safe_dump(agent, sort_keys=False))
    ok(sh("flowship agent --config cluster-agent.yaml --duration 3s --no-progress", work,
          env={"NODE_NAME": "walk-node"}), "flowship agent --config configs/cluster-agent-to-kafka.yaml")

    # The archive served to hubble observe (as written: the recorded flows are older than 24h, so the README's
    # query answers nothing; a query over their time shows that the server answers).
    server = subprocess.Popen(["bash", "-c", "exec flowship history --archive ./flows"], cwd=work,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        bin_dir = work / "bin"
        bin_dir.mkdir()
        (bin_dir / "hubble").symlink_to(hubble)
        path = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
        observe = "hubble observe --server 127.0.0.1:4255 --since 24h -n production --verdict DROPPED"
        deadline = time.monotonic() + 60
        while True:
            proc = sh(observe, work, env=path, timeout=120)
            if proc.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(0.5)  # the server is still starting
        ok(proc, observe)
        old = ok(sh("hubble observe --server 127.0.0.1:4255 --since 2000-01-01T00:00:00Z --last 5 -o jsonpb", work,
                    env=path), "hubble observe --last 5")
        assert len(old.splitlines()) == 5, old
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)

    # Questions over ./flows, then maintenance, then the version.
    report = ok(sh("flowship report all --parquet ./flows", work), "flowship report all --parquet ./flows")
    assert "Where the latency goes" in report and "Dropped / denied calls" in report
    drops = ok(sh("flowship report drops --since 1h --namespace production", work), "report drops")
    assert "Dropped / denied calls" in drops
    recorded_hours = list((work / "flows" / "flows").glob("dt=2021-*/hour=*/*.parquet"))
    assert recorded_hours, "the recorded flows (2021) should be in ./flows"
    summary = ok(sh("flowship compact ./flows --retention 30d", work), "flowship compact ./flows --retention 30d")
    assert '"deleted_partitions"' in summary
    assert not list((work / "flows" / "flows").glob("dt=2021-*/hour=*/*.parquet")), \
        "the recorded flows (2021) are past the 30-day retention"
    version = ok(sh("flowship --version", work), "flowship --version")
    assert version.startswith("flowship ")


@pytest.fixture(scope="module")
def kafka_server_address() -> str:
    devservers.start("kafka", devservers.KAFKA)
    return devservers.KAFKA
