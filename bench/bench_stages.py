"""Throughput and memory of the columnar stages on synthetic flows shaped like the Hubble fixtures.

    python bench/bench_stages.py [--flows 2000000] [--batch 65536] [--only filter,sample]
                                 [--paths one-by-one,fused]

Flows come from bench/flowgen.py (Arrow columns, a few seconds for millions):
2000 pods in 40 namespaces with Cilium label sets, connections of several
flows in both directions over ten minutes, HTTP through the proxy (kube-probe
and Prometheus requests among them), DNS (some NXDOMAIN), policy drops,
reserved identities and Cilium node health checks (port 4240 and ICMP).
Arrow is limited to one CPU thread so the figures are per core.
Each scenario warms up on three batches, then pushes every batch through
fresh stages (and closes them, so the aggregate's final windows count);
flows/s is measured over that pass, in wall time and in this process's
CPU time (the fairer figure on a shared machine). Peak RSS is the process high-water
mark during the pass (reset before it through /proc/self/clear_refs), so
it includes the generated input, whose size is printed first.

Each scenario runs along two paths, one after the other in the same process:
``one-by-one`` hands every batch to each stage's ``process`` in turn (each
dropping stage copies its survivors), ``fused`` goes through the pipeline
runtime, where a run of mask stages (healthcheck, filter, sample) copies the
surviving rows once. Scenarios ending in ``+parquet`` also write the result
with the Parquet sink (zstd 1, no fsync) into a temporary directory, closing
it at the end so every file is published inside the timed pass.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flowgen import generate_batch  # noqa: E402

from flowship.components import Context  # noqa: E402
from flowship.config import parse  # noqa: E402
from flowship.logs import configure  # noqa: E402
from flowship.metrics import Metrics  # noqa: E402
from flowship.pipeline.envelope import Envelope, Receipt  # noqa: E402
from flowship.pipeline.runtime import _close_stages, _run_stages  # noqa: E402
from flowship.registry import component_class, config_class  # noqa: E402

T0 = 1_700_000_000_000_000_000


def generate(n: int, seed: int = 1) -> pa.Table:
    """``n`` flows of 2000 pods in 40 namespaces over ten minutes (see bench/flowgen.py)."""
    return pa.Table.from_batches([generate_batch(n, seed=seed, start_ns=T0, pods=2000, duration_s=600,
                                                 namespaces=40)])


SCENARIOS: dict[str, list[tuple[str, dict]]] = {
    "filter": [("filter", {"allow": [{"verdict": ["FORWARDED", "REDIRECTED", "DROPPED"]}, {"protocol": ["dns"]}],
                           "deny": [{"source_pod": ["kube-system/"]}, {"destination_port": ["4240"]}]})],
    "filter-labels": [("filter", {"allow": [{"source_label": ["k8s:team=shop",
                                                              "k8s:app in (frontend, billing-service)"]}]})],
    "healthcheck": [("healthcheck", {"prometheus": True})],
    "sample": [("sample", {"rate": 10})],
    "aggregate": [("aggregate", {"window": "60s"})],
    "redact": [("redact", {"fields": ["ip", "http_url_query"], "mode": "hash", "key_env": "FLOWSHIP_BENCH_KEY"})],
    "hc-filter-sample": [("healthcheck", {"prometheus": True}),
                         ("filter", {"deny": [{"source_pod": ["kube-system/"]}]}),
                         ("sample", {"rate": 10})],
    "chained": [("healthcheck", {"prometheus": True}),
                ("filter", {"deny": [{"source_pod": ["kube-system/"]}]}),
                ("sample", {"rate": 10}),
                ("aggregate", {"window": "60s"})],
    # the same stages, sampling first: later stages see a tenth of the rows. Nearly the same flows
    # survive (an always-kept 5xx of an unsampled probe connection loses its request, so stays)
    "chained-sample-first": [("sample", {"rate": 10}),
                             ("healthcheck", {"prometheus": True}),
                             ("filter", {"deny": [{"source_pod": ["kube-system/"]}]}),
                             ("aggregate", {"window": "60s"})],
}
SCENARIOS["hc-filter-sample+parquet"] = SCENARIOS["hc-filter-sample"]
SCENARIOS["parquet"] = []
PATHS = ("one-by-one", "fused")


def build_stages(spec: list[tuple[str, dict]]) -> list:
    stages = []
    metrics = Metrics()
    for i, (type_name, body) in enumerate(spec):
        config = parse(config_class("stages", type_name), body, "<bench>", f"stages[{i}]")
        ctx = Context(name=f"{type_name}-{i}", metrics=metrics, node_name="bench", data_dir=Path("/tmp"))
        stages.append(component_class("stages", type_name)(config, ctx))
    return stages


def build_sink(directory: Path) -> object:
    """A Parquet sink writing into ``directory`` without fsync (the disk is not what is measured)."""
    config = parse(config_class("sinks", "parquet"), {"path": str(directory), "fsync": False}, "<bench>", "sinks[0]")
    ctx = Context(name="parquet", metrics=Metrics(), node_name="bench", data_dir=directory)
    sink = component_class("sinks", "parquet")(config, ctx)
    sink.start()
    return sink


def one_by_one(stages: list, envs: list[Envelope]) -> list[Envelope]:
    """Each stage's ``process`` in turn: every dropping stage copies its survivors."""
    for stage in stages:
        envs = [out for env in envs for out in stage.process(env)]
    return envs


def run_once(stages: list, batches: list[pa.RecordBatch], path: str = "one-by-one", sink: object = None) -> int:
    """Push every batch through the stages (and the sink), then close them in order; returns rows out."""
    run = one_by_one if path == "one-by-one" else _run_stages
    rows_out = 0

    def deliver(envs: list[Envelope]) -> int:
        rows = 0
        for env in envs:
            rows += env.batch.num_rows
            if sink is not None and env.batch.num_rows:
                sink.write(env)
        return rows

    for batch in batches:
        rows_out += deliver(run(stages, [Envelope(batch, [Receipt()])]))
    if path == "one-by-one":
        for i, stage in enumerate(stages):
            rows_out += deliver(one_by_one(stages[i + 1:], stage.close()))
    else:
        rows_out += deliver(_close_stages(stages))
    if sink is not None:
        sink.flush()
        sink.close()
    return rows_out


def reset_peak_rss() -> None:
    """Start a new high-water mark (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_scenario(name: str, batches: list[pa.RecordBatch], path: str) -> tuple[int, int, float, float, float]:
    """Warm up on a few batches (fresh stages), then time a full pass with fresh stages."""
    with_sink = name.endswith("parquet")
    directory = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    try:
        run_once(build_stages(SCENARIOS[name]), batches[:3], path, build_sink(directory / "warm") if with_sink else None)
        gc.collect()
        reset_peak_rss()
        stages = build_stages(SCENARIOS[name])
        sink = build_sink(directory / "timed") if with_sink else None
        start, cpu_start = time.perf_counter(), time.process_time()
        rows_out = run_once(stages, batches, path, sink)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return sum(b.num_rows for b in batches), rows_out, elapsed, cpu, peak_rss_mib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", type=int, default=2_000_000)
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--paths", default=",".join(PATHS), help="one-by-one, fused or both (side by side)")
    args = parser.parse_args()
    configure("warning")
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    os.environ.setdefault("FLOWSHIP_BENCH_KEY", "bench-key")

    t = time.perf_counter()
    table = generate(args.flows)
    batches = table.to_batches(max_chunksize=args.batch)
    gen_s = time.perf_counter() - t
    base_mib = peak_rss_mib()
    print(f"generated {table.num_rows:,} flows in {len(batches)} batches of <= {args.batch:,} rows "
          f"({table.nbytes / 2**20:,.0f} MiB of Arrow data) in {gen_s:.1f}s; RSS after generation {base_mib:,.0f} MiB")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(flows/s = per wall second; per CPU s = per second of this process's CPU time)")
    paths = args.paths.split(",")
    print(f"{'scenario':<26} {'path':<10} {'flows in':>11} {'rows out':>11} {'wall s':>7} {'flows/s':>11} "
          f"{'CPU s':>6} {'per CPU s':>11} {'peak RSS MiB':>13}")
    for name in args.only.split(","):
        per_cpu = {}
        for path in paths:
            rows_in, rows_out, elapsed, cpu, peak = run_scenario(name, batches, path)
            per_cpu[path] = rows_in / cpu
            print(f"{name:<26} {path:<10} {rows_in:>11,} {rows_out:>11,} {elapsed:>7.2f} {rows_in / elapsed:>11,.0f} "
                  f"{cpu:>6.2f} {rows_in / cpu:>11,.0f} {peak:>13,.0f}")
        if len(per_cpu) == 2:
            print(f"{name:<26} {'fused / one-by-one per CPU s: ' + format(per_cpu['fused'] / per_cpu['one-by-one'], '.2f')}")


if __name__ == "__main__":
    main()
