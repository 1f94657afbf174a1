"""bench/bench_peers.py's inputs and flowship's side of it, on 100 generated flows.

The flat records flowlogs-pipeline is fed carry the Hubble flows' values, and every case of the benchmark
runs flowship with its real config, its output checked against counts taken from the input: nothing for
discard, exactly the DROPPED flows for the filter, every flow in Parquet. The peers themselves
(flowlogs-pipeline, Benthos, built from the Go module proxy by ``deploy/dev/build-flowlogs-pipeline`` and
``deploy/dev/build-benthos``) are checked the same way by the benchmark on each of its runs; their first build
takes tens of minutes, which is a benchmark's cost, not the test suite's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import bench_peers  # noqa: E402

FLOWS = 100


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


@pytest.mark.parametrize("case", bench_peers.CASES)
def test_flowship_processes_the_bench_case(case: str, inputs: bench_peers.Inputs, tmp_path: Path) -> None:
    _, rows = bench_peers.run_case("flowship", case, inputs, tmp_path, {})
    if case == "filter":
        assert rows == inputs.matching
    elif case == "parquet":
        assert rows == FLOWS
