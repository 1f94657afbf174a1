"""A one-line live progress display on a terminal (flows/s in, out per sink, dropped).

Per sink it also shows the rows still to deliver (``left``), so that the wait
at the end of a finite input, while the sinks drain their buffers, says what
it is waiting for.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from flowship.metrics import Metrics


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


class Progress:
    """Redraws one status line on stderr every ``interval`` seconds while running."""

    def __init__(self, metrics: Metrics, sinks: list[str], interval: float = 1.0,
                 pending: Callable[[], dict[str, int]] | None = None) -> None:
        self.metrics = metrics
        self.sinks = sinks
        self.pending = pending
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._last_in = 0.0
        self._last_t = time.monotonic()

    def line(self) -> str:
        m = self.metrics
        flows_in = m.value("flowship_flows_in_total")
        now = time.monotonic()
        rate = (flows_in - self._last_in) / max(now - self._last_t, 1e-9)
        self._last_in, self._last_t = flows_in, now
        parts = [f"in {_fmt(flows_in)} ({_fmt(rate)}/s)"]
        left = self.pending() if self.pending is not None else {}
        for sink in self.sinks:
            part = f"{sink} {_fmt(m.value('flowship_sink_flows_total', sink=sink))}"
            if left.get(sink):
                part += f" (left {_fmt(left[sink])})"
            parts.append(part)
        dropped = m.value("flowship_stage_dropped_total")
        rejected = m.value("flowship_source_rejected_total")
        parts.append(f"dropped {_fmt(dropped)}")
        if rejected:
            parts.append(f"rejected {_fmt(rejected)}")
        return " | ".join(parts)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            sys.stderr.write("\r\x1b[2K" + self.line())
            sys.stderr.flush()

    def start(self) -> None:
        if sys.stderr.isatty():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
