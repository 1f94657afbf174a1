"""``flowship export --config FILE`` that also writes its final metrics to a JSON file.

The fault tests need counters as they stand when the run ends (rows dropped by
a full buffer, rows delivered per sink), after the /metrics endpoint is gone.
This runs exactly the CLI's pipeline (same config loading, signal handling
and summary) and then dumps every sample of the process's registry plus the
peak RSS the kernel recorded.

    python3 tests/faults/export_with_metrics.py --config FILE --dump OUT.json [--metrics HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flowship import logs  # noqa: E402
from flowship.config import ConfigError, load_file  # noqa: E402
from flowship.metrics import Metrics  # noqa: E402
from flowship.pipeline.launch import run_pipeline  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--dump", required=True)
    parser.add_argument("--metrics")
    args = parser.parse_args()
    logs.configure("info", True)
    try:
        config = load_file(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"invalid configuration:\n{exc}\n")
        return 2
    metrics = Metrics()
    code = run_pipeline(config, args.metrics, False, metrics=metrics)
    samples = []
    for family in metrics.registry.collect():
        for s in family.samples:
            samples.append({"name": s.name, "labels": s.labels, "value": s.value})
    Path(args.dump).write_text(json.dumps({"exit_code": code, "samples": samples,
                                           "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return code


if __name__ == "__main__":
    sys.exit(main())
