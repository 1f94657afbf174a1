"""Short runs import only what they use: ``--version``, ``--help`` and ``validate`` load no Arrow, no gRPC
and no sink client, and an export to Parquet loads no client of a sink or source it does not have.

Start-up is mostly imports (pyarrow + numpy alone cost ~0.3 CPU-s); which modules a run imports is the
outcome checked here, from ``python -X importtime``, not how long it took (bench/bench_startup.py measures).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Libraries a command pays for only when a component it runs needs them.
NETWORK_CLIENTS = ("grpc", "confluent_kafka", "elasticsearch", "elastic_transport", "urllib3", "requests", "duckdb")
HEAVY = ("pyarrow", "numpy", *NETWORK_CLIENTS, "prometheus_client", "structlog")


def imported(args: list[str], cwd: Path, stdin: bytes | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime -m flowship ARGS``; the top-level packages it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "flowship", *args], cwd=cwd, input=stdin,
                          capture_output=True, timeout=120, env={**os.environ, "NODE_NAME": "node-1"})
    packages = set()
    for line in proc.stderr.decode(errors="replace").splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            packages.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return proc, packages


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["export", "--help"], ["history", "--help"]],
                         ids=" ".join)
def test_version_and_help_import_no_heavy_library(tmp_path, args):
    proc, packages = imported(args, tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "flowship" in packages  # the parse saw the imports at all
    assert packages.isdisjoint(HEAVY), sorted(packages & set(HEAVY))


# stdin, Hubble files or Hubble Relay (protobuf, to check filters) -> healthcheck -> Parquet on disk or S3
@pytest.mark.parametrize("config", ["export-default.yaml", "hubble-files-to-parquet.yaml", "hubble-relay-to-s3.yaml"])
def test_validate_imports_no_heavy_library(tmp_path, config):
    proc, packages = imported(["validate", str(REPO / "configs" / config)], tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b": valid" in proc.stdout
    assert packages.isdisjoint(HEAVY), sorted(packages & set(HEAVY))


def test_validate_of_json_lines_sinks_imports_no_heavy_library(tmp_path):
    config = tmp_path / "jsonl.yaml"
    config.write_text(f"sources:\n  - type: stdin\nsinks:\n  - type: stdout\n"
                      f"  - type: file\n    path: {tmp_path / 'flows.jsonl'}\n    format: ecs\n")
    proc, packages = imported(["validate", str(config)], tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert packages.isdisjoint(HEAVY), sorted(packages & set(HEAVY))


def test_an_invalid_config_is_reported_without_heavy_libraries(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("sources:\n  - type: stdin\nsinks:\n  - type: parquet\n    max_file_rows: 0\n")
    proc, packages = imported(["validate", str(config)], tmp_path)
    assert proc.returncode == 6
    assert b"sinks[0].max_file_rows: expected an integer >= 1, got 0" in proc.stderr
    assert packages.isdisjoint(HEAVY), sorted(packages & set(HEAVY))


def test_an_export_to_parquet_imports_no_network_client(tmp_path, fixture_lines):
    config = tmp_path / "export.yaml"
    config.write_text(f"sources:\n  - type: stdin\nsinks:\n  - type: parquet\n    path: {tmp_path / 'out'}\n"
                      f"data_dir: {tmp_path / 'state'}\n")
    proc, packages = imported(["--log-format", "json", "export", "--no-progress", "--config", str(config)], tmp_path,
                              stdin=b"\n".join(fixture_lines[:5]) + b"\n")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert list((tmp_path / "out").rglob("*.parquet"))
    assert {"pyarrow", "numpy"} <= packages  # what the export needs
    assert packages.isdisjoint(NETWORK_CLIENTS), sorted(packages & set(NETWORK_CLIENTS))
