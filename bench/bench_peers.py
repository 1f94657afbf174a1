"""flowship side by side with flowlogs-pipeline and Benthos core, on the same generated flows.

Cases, each tool reading the flows on its standard input and writing JSON lines to its standard output
(redirected to a file):

  discard    parse every flow, then drop it (a filter that removes everything; nothing is written)
  filter     parse, keep verdict DROPPED, write the kept flows as JSON lines
  aggregate  count flows per (60 s window, source namespace, destination namespace, verdict), or the
             closest the tool has, and write the rows as JSON lines
  parquet    flowship only (the peers have no Parquet output): parse and write Parquet

flowship and Benthos read the Hubble JSON lines of ``bench/flowgen.py``; flowlogs-pipeline reads the same
flows converted beforehand (not timed) to its own flat record form (``SrcAddr``, ``SrcK8S_Namespace``,
``Verdict``, ...). Every run is checked: the discard case writes nothing, the filter case writes exactly the
flows whose verdict is DROPPED, and the aggregate rows add up to every flow.

Each run is a child process; its CPU time (user + system) and peak RSS come from ``os.wait4``. Benthos and
flowship exit at the end of their input. flowlogs-pipeline is fed through a pipe left open: its stdin
ingest may drop the lines still queued when it sees the end of input, and its aggregate stage never ends.
It is stopped once everything is written and it has been idle for a few seconds (aggregate: once its
rows have counted every flow), and its wall time ends at its last activity (output or CPU).

Usage: python3 bench/bench_peers.py [-n FLOWS] [--runs 3] [--cases discard,filter,aggregate,parquet]
                                    [--tools flowship,flowlogs-pipeline,benthos] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CASES = ["discard", "filter", "aggregate", "parquet"]
TOOLS = ["flowship", "flowlogs-pipeline", "benthos"]
BUILD_SCRIPTS = {"flowlogs-pipeline": "build-flowlogs-pipeline", "benthos": "build-benthos"}
FILTER_VERDICT = "DROPPED"
IDLE_STOP_S = 7.0  # longer than flowlogs-pipeline's 5 s batching timeout before its extract stage


@dataclass
class Inputs:
    """The generated flows in both forms and the counts every tool's output must match."""

    hubble: Path
    flat: Path
    flows: int
    matching: int


@dataclass
class Run:
    """One measured run of one tool on one case."""

    cpu_s: float
    wall_s: float
    rss_mib: float
    output: Path


def build_binary(tool: str) -> Path:
    """Path of a peer's binary, built and cached by its deploy/dev script when missing."""
    script = REPO / "deploy" / "dev" / BUILD_SCRIPTS[tool]
    proc = subprocess.run([str(script)], capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{script.name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(lines[-1])


def _name(endpoint: dict) -> tuple[str, str, str]:
    """(pod name, owner name, owner kind) of a Hubble endpoint, empty strings when absent."""
    workloads = endpoint.get("workloads") or [{}]
    return endpoint.get("pod_name", ""), workloads[0].get("name", ""), workloads[0].get("kind", "")


def to_flat_record(event: dict) -> dict:
    """A Hubble ExportEvent as flowlogs-pipeline's flat record, with the same field values."""
    flow = event["flow"]
    ip = flow.get("IP", {})
    l4 = flow.get("l4", {})
    proto, ports = next(iter(l4.items()), ("", {}))
    src, dst = flow.get("source", {}), flow.get("destination", {})
    src_pod, src_owner, src_kind = _name(src)
    dst_pod, dst_owner, dst_kind = _name(dst)
    record = {
        "Time": flow["time"],
        "SrcAddr": ip.get("source", ""),
        "DstAddr": ip.get("destination", ""),
        "SrcPort": ports.get("source_port", 0),
        "DstPort": ports.get("destination_port", 0),
        "Proto": {"TCP": 6, "UDP": 17, "ICMPv4": 1, "ICMPv6": 58}.get(proto, 0),
        "Flags": ",".join(sorted(ports.get("flags", {}))),
        "SrcK8S_Namespace": src.get("namespace", ""),
        "SrcK8S_Name": src_pod,
        "SrcK8S_OwnerName": src_owner,
        "SrcK8S_OwnerType": src_kind,
        "SrcIdentity": src.get("identity", 0),
        "DstK8S_Namespace": dst.get("namespace", ""),
        "DstK8S_Name": dst_pod,
        "DstK8S_OwnerName": dst_owner,
        "DstK8S_OwnerType": dst_kind,
        "DstIdentity": dst.get("identity", 0),
        "Verdict": flow.get("verdict", ""),
        "DropReason": flow.get("drop_reason_desc", ""),
        "FlowDirection": flow.get("traffic_direction", ""),
        "IsReply": flow.get("is_reply", False),
        "Type": flow.get("Type", ""),
        "NodeName": flow.get("node_name", ""),
    }
    l7 = flow.get("l7")
    if l7:
        http, dns = l7.get("http"), l7.get("dns")
        if http:
            record.update(HttpMethod=http.get("method", ""), HttpUrl=http.get("url", ""), HttpCode=http.get("code", 0))
        if dns:
            record.update(DnsQuery=dns.get("query", ""), DnsRcode=dns.get("rcode", 0))
        if "latency_ns" in l7:
            record["L7LatencyNs"] = int(l7["latency_ns"])
    return record


def make_inputs(workdir: Path, flows: int) -> Inputs:
    """Generate ``flows`` Hubble JSON lines (bench/flowgen.py) and their flat form for flowlogs-pipeline."""
    hubble = workdir / f"flows-{flows}.jsonl"
    flat = workdir / f"flows-{flows}.flp.jsonl"
    if not hubble.exists():
        subprocess.run([sys.executable, str(HERE / "flowgen.py"), str(hubble), "-n", str(flows)], check=True)
    matching = 0
    with hubble.open("rb") as fin, flat.open("wb") as fout:
        for line in fin:
            event = orjson.loads(line)
            matching += event["flow"].get("verdict") == FILTER_VERDICT
            fout.write(orjson.dumps(to_flat_record(event)) + b"\n")
    return Inputs(hubble, flat, flows, matching)


FLOWSHIP_STAGES = {
    "discard": "stages:\n  - type: filter\n    deny: [{}]\n",
    "filter": f"stages:\n  - type: filter\n    allow: [{{verdict: {FILTER_VERDICT}}}]\n",
    "aggregate": ("stages:\n  - type: aggregate\n    window: 60s\n"
                  "    group_by: [src_namespace, dst_namespace, verdict]\n    clock: event\n"),
    "parquet": "",
}

FLP_FILTER = {
    "discard": "          - type: remove_entry_if_exists\n            removeEntry: {input: SrcAddr}\n",
    "filter": ("          - type: remove_entry_if_not_equal\n"
               f"            removeEntry: {{input: Verdict, value: {FILTER_VERDICT}}}\n"),
}

BENTHOS_HEAD = "http: {enabled: false}\nlogger: {level: WARN}\nmetrics: {none: {}}\n"
BENTHOS_STDIN = "stdin: {scanner: {lines: {max_buffer_size: 1048576}}}"
BENTHOS_PIPELINE = {
    "discard": ("pipeline:\n  processors:\n    - mapping: |\n        root = this\n"
                "        if this.flow != null { root = deleted() }\noutput: {drop: {}}\n"),
    "filter": ("pipeline:\n  processors:\n    - mapping: |\n        root = this\n"
               f"        if this.flow.verdict != \"{FILTER_VERDICT}\" {{ root = deleted() }}\n"
               "output: {stdout: {codec: lines}}\n"),
}
# Benthos core keeps no keyed state across batches: counts are per input batch of 65,536 flows (partial
# aggregates, as flowship's stage computes before merging), keyed by window and the three keys.
BENTHOS_AGGREGATE = """input:
  broker:
    inputs:
      - STDIN
    batching:
      count: 65536
      period: 1s
      processors:
        - mapping: |
            let t = this.flow.time.ts_unix()
            root.window_start = $t - $t % 60
            root.src_namespace = this.flow.source.namespace.or("")
            root.dst_namespace = this.flow.destination.namespace.or("")
            root.verdict = this.flow.verdict
        - group_by_value:
            value: '${! json("window_start") }|${! json("src_namespace") }|${! json("dst_namespace") }|${! json("verdict") }'
        - archive: {format: json_array}
        - mapping: |
            root = this.index(0)
            root.flows = this.length()
output: {stdout: {codec: lines}}
""".replace("STDIN", BENTHOS_STDIN)


def flowship_config(case: str, out_dir: Path) -> str:
    """flowship's config for a case (Hubble JSON on stdin)."""
    if case == "parquet":
        sink = f"sinks:\n  - type: parquet\n    path: {out_dir / 'parquet'}\n"
    else:
        sink = "sinks:\n  - type: stdout\n"
    return (f"data_dir: {out_dir / 'data'}\nhubble_metrics: {{enabled: false}}\n"
            "sources:\n  - type: stdin\n" + FLOWSHIP_STAGES[case] + sink)


def flp_config(case: str) -> str:
    """flowlogs-pipeline's config for a case (flat JSON records on stdin)."""
    head = "log-level: error\nmetricsSettings: {disableGlobalServer: true}\n"
    if case == "aggregate":
        middle = ("  - name: aggregate\n    extract:\n      type: aggregates\n      aggregates:\n"
                  "        defaultExpiryTime: 60s\n        rules:\n          - name: by_ns_verdict\n"
                  "            groupByKeys: [SrcK8S_Namespace, DstK8S_Namespace, Verdict]\n"
                  "            operationType: count\n            expiryTime: 60s\n")
        name = "aggregate"
    else:
        middle = ("  - name: filter\n    transform:\n      type: filter\n      filter:\n        rules:\n"
                  + FLP_FILTER[case])
        name = "filter"
    write = ("    write: {type: none}\n" if case == "discard"
             else "    write:\n      type: stdout\n      stdout: {format: json}\n")
    return (head + "pipeline:\n  - name: ingest\n"
            f"  - name: {name}\n    follows: ingest\n  - name: write\n    follows: {name}\n"
            "parameters:\n  - name: ingest\n    ingest: {type: stdin}\n" + middle + "  - name: write\n" + write)


def benthos_config(case: str) -> str:
    """Benthos' config for a case (Hubble JSON on stdin)."""
    if case == "aggregate":
        return BENTHOS_HEAD + BENTHOS_AGGREGATE
    return BENTHOS_HEAD + f"input:\n  {BENTHOS_STDIN}\n" + BENTHOS_PIPELINE[case]


def command(tool: str, case: str, run_dir: Path, binaries: dict[str, Path]) -> list[str]:
    """Write the tool's config for the case into run_dir and return its command line."""
    config = run_dir / "config.yaml"
    if tool == "flowship":
        config.write_text(flowship_config(case, run_dir))
        return [sys.executable, "-c", "import sys; from flowship.cli import main; sys.exit(main())",
                "export", "--config", str(config)]
    if tool == "flowlogs-pipeline":
        config.write_text(flp_config(case))
        return [str(binaries[tool]), "--config", str(config)]
    config.write_text(benthos_config(case))
    return [str(binaries[tool]), "-c", str(config)]


def _cpu_ticks(pid: int) -> int:
    """utime + stime of a live process in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _feed(src: BinaryIO, pipe: BinaryIO | None) -> None:
    """Copy a file into a child's stdin and leave the pipe open (an end of input is never seen)."""
    assert pipe is not None
    while chunk := src.read(1 << 20):
        try:
            pipe.write(chunk)
            pipe.flush()
        except BrokenPipeError:
            return


class AggregateProgress:
    """Flows counted so far in flowlogs-pipeline's aggregate output (the ``recent_count`` of each row).

    Its aggregate stage re-emits every group on a timer even when nothing new came in, so the output never
    goes quiet: the run is complete once the rows have counted every input flow.
    """

    def __init__(self, path: Path, flows: int) -> None:
        self.path, self.flows, self.offset, self.counted, self.rest = path, flows, 0, 0, b""

    def __call__(self) -> bool:
        """Read what was appended since the last call; True once every flow is counted."""
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = self.rest + fh.read()
            self.offset = fh.tell()
        *lines, self.rest = data.split(b"\n")
        for line in lines:
            if line.startswith(b'{"'):
                self.counted += int(orjson.loads(line).get("recent_count", 0))
        return self.counted >= self.flows


def measure(argv: list[str], stdin: Path, run_dir: Path, stop_on_idle: bool, flows: int | None = None) -> Run:
    """Run argv with stdin from a file and stdout to run_dir/out.jsonl; CPU, wall and peak RSS of the child.

    With ``stop_on_idle`` the file is fed through a pipe that stays open, and the child is stopped (SIGTERM)
    once all of it is written and the child has been idle (no output, no CPU) for IDLE_STOP_S, or, given
    ``flows``, once its aggregate output has counted that many flows; its wall time ends at its last
    activity.
    """
    out, err = run_dir / "out.jsonl", run_dir / "stderr.txt"
    progress = AggregateProgress(out, flows) if flows is not None else None
    with stdin.open("rb") as fin, out.open("wb") as fout, err.open("wb") as ferr:
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stop_on_idle else fin, stdout=fout, stderr=ferr,
                                cwd=run_dir)
        if stop_on_idle:
            feeder = threading.Thread(target=_feed, args=(fin, proc.stdin), daemon=True)
            feeder.start()
            last, last_change = None, start
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                end = time.monotonic()
                if pid:
                    break
                state = (feeder.is_alive(), out.stat().st_size, _cpu_ticks(proc.pid))
                if state != last:
                    last, last_change = state, end
                consumed = not state[0]
                if consumed and progress is not None and progress():
                    status, usage = _stop(proc)
                    break
                if consumed and end - last_change >= IDLE_STOP_S:
                    status, usage = _stop(proc)
                    end = last_change
                    break
                time.sleep(0.05)
        else:
            _, status, usage = os.wait4(proc.pid, 0)
            end = time.monotonic()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
    if not stop_on_idle and proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}:\n{err.read_text()[-4000:]}")
    return Run(usage.ru_utime + usage.ru_stime, end - start, usage.ru_maxrss / 1024, out)


def _stop(proc: subprocess.Popen) -> tuple[int, resource.struct_rusage]:
    """SIGTERM (then SIGKILL after 10 s) and reap; exit status and resource usage."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, status, usage = _wait4(proc.pid, timeout=10)
    except TimeoutError:
        proc.kill()
        _, status, usage = os.wait4(proc.pid, 0)
    return status, usage


def _wait4(pid: int, timeout: float) -> tuple[int, int, resource.struct_rusage]:
    """os.wait4 with a timeout (TimeoutError when the process is still running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = os.wait4(pid, os.WNOHANG)
        if result[0]:
            return result
        time.sleep(0.05)
    raise TimeoutError(pid)


def _lines(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file (other lines, such as flowlogs-pipeline's start-up banner, are skipped)."""
    rows = []
    with path.open("rb") as fh:
        for line in fh:
            if line.startswith(b'{"'):
                rows.append(orjson.loads(line))
    return rows


def check(tool: str, case: str, run: Run, inputs: Inputs) -> int:
    """Check a run's output against the expected counts; returns the number of output rows."""
    if case == "parquet":
        import pyarrow.dataset as ds

        rows = ds.dataset(run.output.parent / "parquet", format="parquet").count_rows()
        _expect(tool, case, "rows", rows, inputs.flows)
        return rows
    rows = _lines(run.output)
    if case == "discard":
        _expect(tool, case, "lines", len(rows), 0)
    elif case == "filter":
        _expect(tool, case, "lines", len(rows), inputs.matching)
        verdicts = {row.get("Verdict") or row.get("flow", {}).get("verdict") for row in rows}
        if rows and verdicts != {FILTER_VERDICT}:
            raise AssertionError(f"{tool} {case}: verdicts {verdicts}")
    elif tool == "flowship":
        _expect(tool, case, "flows in aggregate rows", sum(row["flows_raw"] for row in rows), inputs.flows)
    elif tool == "benthos":
        _expect(tool, case, "flows in aggregate rows", sum(row["flows"] for row in rows), inputs.flows)
    else:
        # flowlogs-pipeline re-emits every group after each batch: recent_count is the count since the last
        _expect(tool, case, "flows in aggregate rows", int(sum(row["recent_count"] for row in rows)), inputs.flows)
    return len(rows)


def _expect(tool: str, case: str, what: str, got: int, want: int) -> None:
    """Raise AssertionError naming the tool and case when got != want."""
    if got != want:
        raise AssertionError(f"{tool} {case}: {got} {what}, expected {want}")


def run_case(tool: str, case: str, inputs: Inputs, workdir: Path, binaries: dict[str, Path],
             index: int = 0) -> tuple[Run, int]:
    """One checked run of a tool on a case, in its own directory under workdir."""
    run_dir = workdir / f"{tool}-{case}-{index}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    argv = command(tool, case, run_dir, binaries)
    stdin = inputs.flat if tool == "flowlogs-pipeline" else inputs.hubble
    flp = tool == "flowlogs-pipeline"
    run = measure(argv, stdin, run_dir, stop_on_idle=flp, flows=inputs.flows if flp and case == "aggregate" else None)
    rows = check(tool, case, run, inputs)
    return run, rows


def versions(binaries: dict[str, Path]) -> dict[str, str]:
    """Version strings of the tools, for the report."""
    out = {"python": sys.version.split()[0]}
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if Path(go).exists():
        out["go"] = subprocess.run([go, "version"], capture_output=True, text=True, check=False).stdout.strip()
    for tool, path in binaries.items():
        out[tool] = path.parent.name
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=300_000, help="flows to generate")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--workdir", type=Path, help="keep inputs and outputs here (default: a temporary directory)")
    args = parser.parse_args()
    cases, tools = args.cases.split(","), args.tools.split(",")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="flowship-bench-peers."))
    workdir.mkdir(parents=True, exist_ok=True)
    binaries = {tool: build_binary(tool) for tool in tools if tool in BUILD_SCRIPTS}
    inputs = make_inputs(workdir, args.n)
    print(f"{inputs.flows} flows, {inputs.hubble.stat().st_size / inputs.flows:.0f} B/flow as Hubble JSON, "
          f"{inputs.flat.stat().st_size / inputs.flows:.0f} B/flow as flowlogs-pipeline records; "
          f"{inputs.matching} with verdict {FILTER_VERDICT}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(" ".join(f"{k}={v}" for k, v in versions(binaries).items()))
    table: dict[tuple[str, str], tuple[float, float, float, int]] = {}
    for case in cases:
        for tool in tools:
            if case == "parquet" and tool != "flowship":
                continue
            runs = []
            for index in range(args.runs):
                run, rows = run_case(tool, case, inputs, workdir, binaries, index)
                runs.append(run)
                print(f"  {case:9} {tool:17} run {index + 1}: cpu {run.cpu_s:6.2f} s  wall {run.wall_s:6.2f} s  "
                      f"rss {run.rss_mib:6.0f} MiB  {rows} rows", flush=True)
            table[case, tool] = (inputs.flows / statistics.median(r.cpu_s for r in runs),
                                 inputs.flows / statistics.median(r.wall_s for r in runs),
                                 statistics.median(r.rss_mib for r in runs), rows)
    print(f"\nmedians of {args.runs} runs (load average now {os.getloadavg()[0]:.1f})")
    print("| case | tool | flows per CPU-second | wall flows/s | peak RSS MiB | output rows | flowship ÷ tool (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for (case, tool), (per_cpu, per_wall, rss, rows) in table.items():
        ratio = ""
        if tool != "flowship" and (case, "flowship") in table:
            ratio = f"{table[case, 'flowship'][0] / per_cpu:.2f}"
        print(f"| {case} | {tool} | {per_cpu:,.0f} | {per_wall:,.0f} | {rss:,.0f} | {rows:,} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
