"""The command line's rough edges, each run as the real command: exit code, one-line message, no traceback.

Exit codes: 2 for a wrong command line (argparse's), 6 for an invalid config, 1 for what could not start;
see ``EXIT_CODES`` in ``flowship.pipeline.launch``.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowship.model.schema import flows_from_rows

REPO = Path(__file__).resolve().parents[2]
T0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
SECOND = 1_000_000_000


def flowship(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowship.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run(args: list[str], cwd: Path, stdin: bytes = b"", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, text=False, timeout=timeout, env=env())


def err(proc: subprocess.CompletedProcess) -> str:
    text = proc.stderr.decode(errors="replace")
    assert "Traceback" not in text, text
    return text


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def free_port(family: socket.AddressFamily = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- exit codes and the help ------------------------------------------------------------------

def test_version_prints_the_distribution_version(tmp_path):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    proc = run(flowship("--version"), tmp_path)
    assert proc.returncode == 0, err(proc)
    assert proc.stdout.decode() == f"flowship {version}\n"


def test_usage_error_exits_2_and_invalid_config_exits_6(tmp_path):
    proc = run(flowship("export", "--bogus"), tmp_path)
    assert proc.returncode == 2
    assert "flowship: error: unrecognized arguments: --bogus" in err(proc)
    bad = write(tmp_path / "c.yaml", "sources: [{type: stdin}]\nsinks: [{type: parquet, pth: x}]\n")
    for verb in ("validate", "export"):
        proc = run(flowship(verb, "--config", str(bad)), tmp_path)
        assert proc.returncode == 6
        assert f"{bad}: sinks[0].pth: unknown key" in err(proc)
    # the positional form of validate
    proc = run(flowship("validate", str(bad)), tmp_path)
    assert proc.returncode == 6 and f"{bad}: sinks[0].pth: unknown key" in err(proc)
    proc = run(flowship("validate"), tmp_path)
    assert proc.returncode == 2 and "the config file is required" in err(proc)
    # the help lists the codes as the code defines them
    from flowship.pipeline.launch import EXIT_CODES

    help_text = run(flowship("export", "--help"), tmp_path).stdout.decode()
    assert EXIT_CODES in help_text
    codes = dict(re.findall(r"^  (\d)  (\w+)", EXIT_CODES, re.M))
    assert codes == {"0": "ok", "1": "a", "2": "usage", "3": "finished", "4": "undelivered", "5": "dead",
                     "6": "invalid"}


def test_top_level_help_and_readme_name_the_report_questions_the_code_has(tmp_path):
    from flowship.cli import REPORT_QUESTIONS

    help_text = run(flowship("--help"), tmp_path).stdout.decode()
    assert "flowship report " + "|".join(REPORT_QUESTIONS) in help_text
    readme = (REPO / "README.md").read_text()
    used = set(re.findall(r"flowship report ([\w|]+)", readme))
    assert used and used <= {*REPORT_QUESTIONS, "latency|drops|all"}, used
    report_help = run(flowship("report", "--help"), tmp_path).stdout.decode()
    for option in ("--since", "--until", "--namespace", "--limit"):
        assert option in report_help


# -- configs without sources or sinks, a directory as a file ----------------------------------

@pytest.mark.parametrize("text,message", [
    ("sources: [{type: stdin}]\n", "c.yaml: sinks: required key is missing: a config needs at least one sink"),
    ("sources: [{type: stdin}]\nsinks: []\n", "c.yaml: sinks: at least one sink is needed"),
    ("sinks: [{type: stdout}]\n", "c.yaml: sources: required key is missing: a config needs at least one source"),
    ("sources: []\nsinks: [{type: stdout}]\n", "c.yaml: sources: at least one source is needed"),
])
def test_a_config_needs_a_source_and_a_sink(tmp_path, text, message):
    config = write(tmp_path / "c.yaml", text)
    for verb in ("validate", "export"):
        proc = run(flowship(verb, "--config", str(config)), tmp_path, stdin=b'{"flow": {}}\n')
        assert proc.returncode == 6, err(proc)
        assert message in err(proc)


def test_the_agent_alone_may_leave_out_sources(tmp_path):
    from flowship.config import ConfigError, load_file

    config = write(tmp_path / "c.yaml", "sinks: [{type: stdout}]\n")
    assert load_file(config, sources_optional=True).sources == []  # flowship agent adds its capture source
    with pytest.raises(ConfigError, match="a config needs at least one source"):
        load_file(config)


def test_a_directory_as_a_file_source_path_is_an_error_naming_it(tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir()
    (directory / "events.log").write_text("")
    config = write(tmp_path / "c.yaml", f"data_dir: {tmp_path}/state\nsources: [{{type: file, paths: ['{directory}']}}]\n"
                                        "sinks: [{type: stdout}]\n")
    proc = run(flowship("export", "--config", str(config), "--no-progress"), tmp_path)
    assert proc.returncode == 1
    assert f"error: source file: {directory}: is a directory; paths: takes files or glob patterns " \
           f"(for example {directory}/*.log)" in err(proc)


# -- report -----------------------------------------------------------------------------------

def test_report_on_a_missing_or_empty_path_is_one_line(tmp_path):
    proc = run(flowship("report", "all", "--parquet", "/nonexistent"), tmp_path)
    assert proc.returncode == 1
    assert err(proc) == "flowship report: /nonexistent: no such directory (give the parquet sink's path with --parquet)\n"
    proc = run(flowship("report", "drops", "--parquet", str(tmp_path)), tmp_path)
    assert proc.returncode == 1 and err(proc) == f"flowship report: no Parquet flow files under {tmp_path}\n"


def _denied(i: int, namespace: str) -> dict:
    """One denied call a second, each from its own client workload (one row each in the drops table)."""
    return {"time": T0 + i * SECOND, "verdict": "DROPPED", "ip_src": f"10.0.9.{i}", "ip_dst": "10.0.3.1",
            "l4_protocol": "TCP", "src_port": 1000 + i, "dst_port": 5432, "src_namespace": namespace,
            "src_workload": f"client-{i:02d}", "dst_namespace": "production", "dst_workload": "database",
            "drop_reason": "POLICY_DENIED", "tcp_flags": 2}


def _drop_rows(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("source")) + 2
    return [line.split()[0] for line in lines[start:] if line and not line.startswith("...")]


def test_report_shows_the_top_rows_and_filters_by_time_and_namespace(tmp_path):
    out = tmp_path / "flows" / "flows" / "dt=2026-01-01" / "hour=00"
    out.mkdir(parents=True)
    rows = [_denied(i, "support" if i % 2 else "staging") for i in range(30)]
    pq.write_table(pa.Table.from_batches([flows_from_rows(rows)]), out / "a.parquet")
    parquet = str(tmp_path / "flows")

    proc = run(flowship("report", "drops", "--parquet", parquet), tmp_path)
    assert proc.returncode == 0, err(proc)
    assert len(_drop_rows(proc.stdout.decode())) == 20
    assert proc.stdout.decode().rstrip().endswith("... 10 more rows (--limit 0 shows all)")

    proc = run(flowship("report", "drops", "--parquet", parquet, "--limit", "0"), tmp_path)
    assert sorted(_drop_rows(proc.stdout.decode())) == sorted(f"{r['src_namespace']}/{r['src_workload']}" for r in rows)
    assert "more row" not in proc.stdout.decode()

    proc = run(flowship("report", "drops", "--parquet", parquet, "--namespace", "support", "--limit", "0"), tmp_path)
    assert sorted(_drop_rows(proc.stdout.decode())) == [f"support/client-{i:02d}" for i in range(1, 30, 2)]

    proc = run(flowship("report", "drops", "--parquet", parquet, "--since", "2026-01-01T00:00:10Z",
                        "--until", "2026-01-01T00:00:13Z"), tmp_path)
    assert _drop_rows(proc.stdout.decode()) == [f"{'support' if i % 2 else 'staging'}/client-{i:02d}"
                                                for i in (10, 11, 12)]

    proc = run(flowship("report", "drops", "--parquet", parquet, "--since", "1h"), tmp_path)  # the flows are older
    assert proc.returncode == 0 and "no dropped flows" in proc.stdout.decode()

    proc = run(flowship("report", "drops", "--parquet", parquet, "--since", "yesterday"), tmp_path)
    assert proc.returncode == 2 and "argument --since: expected a time like 2026-12-02T10:00:00Z" in err(proc)
    proc = run(flowship("report", "drops", "--parquet", parquet, "--limit", "-1"), tmp_path)
    assert proc.returncode == 2 and "argument --limit: expected a whole number >= 0, got '-1'" in err(proc)


def test_a_reader_going_away_ends_quietly(tmp_path):
    """`flowship validate c.yaml | head -1`: stdout closes before flowship writes; no BrokenPipeError."""
    config = write(tmp_path / "c.yaml", "sources: [{type: stdin}]\nsinks: [{type: stdout}]\n")
    proc = subprocess.Popen(flowship("validate", str(config)), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env())
    proc.stdout.close()  # long before the interpreter has started and imported flowship
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 141, stderr.decode()
    assert stderr.decode() == ""


# -- --metrics and --duration -----------------------------------------------------------------

def test_metrics_address_without_a_port_is_a_usage_or_config_error(tmp_path):
    config = write(tmp_path / "c.yaml", f"data_dir: {tmp_path}/state\nsources: [{{type: stdin}}]\n"
                                        "sinks: [{type: stdout}]\n")
    proc = run(flowship("export", "--config", str(config), "--metrics", "localhost"), tmp_path)
    assert proc.returncode == 2
    assert "argument --metrics: expected HOST:PORT (for example 127.0.0.1:9966), got 'localhost': no port" \
        in err(proc)
    proc = run(flowship("export", "--config", str(config), "--metrics", "::1:9966"), tmp_path)
    assert proc.returncode == 2 and "write an IPv6 address in brackets, as in [::1]:9966" in err(proc)
    in_config = write(tmp_path / "m.yaml", f"data_dir: {tmp_path}/state\nmetrics: localhost\n"
                                           "sources: [{type: stdin}]\nsinks: [{type: stdout}]\n")
    proc = run(flowship("export", "--config", str(in_config), "--no-progress"), tmp_path)
    assert proc.returncode == 6
    assert f"{in_config}: metrics: expected HOST:PORT (for example 127.0.0.1:9966), got 'localhost': no port" \
        in err(proc)


def test_metrics_on_ipv6_serves_and_a_taken_ipv6_port_is_one_line(tmp_path):
    config = write(tmp_path / "c.yaml", f"data_dir: {tmp_path}/state\nsources: [{{type: stdin}}]\n"
                                        "sinks: [{type: stdout}]\n")
    port = free_port(socket.AF_INET6, "::1")
    proc = subprocess.Popen(flowship("export", "--config", str(config), "--metrics", f"[::1]:{port}",
                                     "--no-progress"), cwd=tmp_path, stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    try:
        status = None
        deadline = time.monotonic() + 60
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                conn = http.client.HTTPConnection("::1", port, timeout=5)
                conn.request("GET", "/healthz")
                status = conn.getresponse().status
                conn.close()
            except OSError:
                time.sleep(0.2)
        assert status == 200, f"no answer on [::1]:{port} (exit {proc.poll()})"
    finally:
        _, stderr = proc.communicate(timeout=60)  # closes stdin: the end of the input
    assert proc.returncode == 0, stderr.decode()

    taken = socket.socket(socket.AF_INET6)
    taken.bind(("::1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        proc = run(flowship("export", "--config", str(config), "--metrics", f"[::1]:{port}", "--no-progress"),
                   tmp_path)
    finally:
        taken.close()
    assert proc.returncode == 1
    assert f"flowship: cannot start: metrics: cannot listen on [::1]:{port}: the address is already in use " \
           "by another process" in err(proc)


def test_duration_takes_units_as_configs_do(tmp_path):
    """Arguments are checked before the config is loaded: a valid --duration reaches the config check (6)."""
    bad = write(tmp_path / "c.yaml", "sources: [{type: agent}]\n")
    proc = run(flowship("agent", "--config", str(bad), "--duration", "20s"), tmp_path)
    assert proc.returncode == 6 and f"{bad}: sinks: required key is missing" in err(proc)
    for value, message in (("soon", "expected a duration like \"10s\""), ("0s", "expected a duration > 0")):
        proc = run(flowship("agent", "--config", str(bad), "--duration", value), tmp_path)
        assert proc.returncode == 2 and f"argument --duration: {message}" in err(proc)
    from flowship.cli import build_parser

    assert build_parser().parse_args(["agent", "--duration", "20s"]).duration == 20.0
    assert build_parser().parse_args(["agent", "--duration", "1.5"]).duration == 1.5
