"""The peers of bench/bench_peers.py, built by their deploy/dev scripts, on 100 generated flows.

flowlogs-pipeline and Benthos core are built from the Go module proxy by
``deploy/dev/build-flowlogs-pipeline`` and ``deploy/dev/build-benthos`` (cached under ~/.cache/flowship;
the first builds take several minutes). Each case of the benchmark runs with its real configs and the
outputs are checked against counts taken from the input: nothing for discard, exactly the DROPPED flows
for the filter, aggregate rows that add up to every flow.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from gotools import go_tool

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import bench_peers  # noqa: E402

FLOWS = 100


@pytest.fixture(scope="module")
def binaries() -> dict[str, Path]:
    return {tool: Path(go_tool(script)) for tool, script in bench_peers.BUILD_SCRIPTS.items()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> bench_peers.Inputs:
    """100 generated flows, 10 of them DROPPED (the first 100 that flowgen makes have none)."""
    workdir = tmp_path_factory.mktemp("peers")
    pool = workdir / "pool.jsonl"
    subprocess.run([sys.executable, str(REPO / "bench" / "flowgen.py"), str(pool), "-n", "5000"], check=True)
    lines = pool.read_bytes().splitlines(keepends=True)
    dropped = [line for line in lines if orjson.loads(line)["flow"].get("verdict") == "DROPPED"][:10]
    others = [line for line in lines if line not in dropped][:FLOWS - len(dropped)]
    (workdir / f"flows-{FLOWS}.jsonl").write_bytes(b"".join(others + dropped))
    made = bench_peers.make_inputs(workdir, FLOWS)
    assert 0 < made.matching < FLOWS, "the generated flows need some, not all, with the filtered verdict"
    return made


def test_flat_records_carry_the_hubble_values(inputs: bench_peers.Inputs) -> None:
    hubble = [orjson.loads(line) for line in inputs.hubble.read_bytes().splitlines()]
    flat = [orjson.loads(line) for line in inputs.flat.read_bytes().splitlines()]
    assert len(flat) == len(hubble) == FLOWS
    for event, record in zip(hubble, flat, strict=True):
        flow = event["flow"]
        assert record["Verdict"] == flow["verdict"]
        assert record["SrcAddr"] == flow["IP"]["source"]
        assert record["SrcK8S_Namespace"] == flow["source"].get("namespace", "")
        assert record["DstK8S_Namespace"] == flow["destination"].get("namespace", "")


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("case", ["discard", "filter", "aggregate"])
@pytest.mark.parametrize("tool", ["flowlogs-pipeline", "benthos"])
def test_peer_processes_the_bench_case(tool: str, case: str, binaries: dict[str, Path],
                                       inputs: bench_peers.Inputs, tmp_path: Path) -> None:
    run, rows = bench_peers.run_case(tool, case, inputs, tmp_path, binaries)
    assert run.cpu_s > 0
    if case == "filter":
        assert rows == inputs.matching
    elif case == "aggregate":
        assert rows > 0


@pytest.mark.parametrize("case", bench_peers.CASES)
def test_flowship_processes_the_bench_case(case: str, inputs: bench_peers.Inputs, tmp_path: Path) -> None:
    _, rows = bench_peers.run_case("flowship", case, inputs, tmp_path, {})
    if case == "filter":
        assert rows == inputs.matching
    elif case == "parquet":
        assert rows == FLOWS
