"""Base classes of the three component kinds: sources, stages, sinks.

A component is one module under ``exporter/sources``, ``exporter/stages`` or
``exporter/sinks`` holding a config dataclass and the class that uses it; the
registry (``exporter/registry.py``) maps ``type:`` names to both.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowship.pipeline.envelope import Envelope, Receipt

if TYPE_CHECKING:  # for annotations only: a component module that is only validated loads neither
    import pyarrow as pa

    from flowship.metrics import Metrics


@dataclass
class Context:
    """What the runtime hands every component: its name, metrics, logger, paths."""

    name: str
    metrics: Metrics
    node_name: str
    data_dir: Path
    log: Any = field(default=None)
    config_file: str = "<embedded>"
    config_key: str = ""  # where the component's options sit in the config file (``sinks[1]``), for messages

    def __post_init__(self) -> None:
        if self.log is None:
            import structlog

            self.log = structlog.get_logger().bind(component=self.name)


# emit(batch, receipt) blocks while the pipeline is full: that is backpressure.
Emit = Callable[["pa.RecordBatch", Receipt], None]


class Source:
    """Produces flow batches until exhausted or asked to stop.

    ``run`` is called in a thread of its own. It calls ``emit`` with each batch
    and a :class:`Receipt` whose ``on_done`` advances the source's checkpoint.
    A finite source (a file read to the end) returns; a following one returns
    when ``stop`` is set.
    """

    def __init__(self, config: Any, ctx: Context) -> None:
        self.config = config
        self.ctx = ctx

    def run(self, emit: Emit, stop: threading.Event) -> None:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """Counts printed at the end of a finite run (lines read, rejected...)."""
        return {}

    def companion_sinks(self, config_key: str) -> list[tuple[str, Sink]]:
        """Sinks this source brings along (the agent's Observer), by name; the pipeline feeds them after the
        shared stages like the configured sinks. ``config_key`` is where the source sits in the config."""
        return []

    def close(self) -> None:
        """Called once after every sink's final flush: a last checkpoint or commit can be exact now."""


class Stage:
    """Transforms envelopes. Stateless stages override :meth:`transform` only.

    Rows a stage removes on purpose count as delivered: the envelope keeps its
    receipts, so they are released when the (smaller) batch is delivered.
    A stateful stage (aggregate) retains receipts until its output is emitted.
    """

    def __init__(self, config: Any, ctx: Context) -> None:
        self.config = config
        self.ctx = ctx

    def transform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return batch

    def process(self, env: Envelope) -> list[Envelope]:
        if env.kind != "flows":
            return [env]
        return [env.with_batch(self.transform(env.batch))]

    def tick(self, now_ns: int) -> list[Envelope]:
        """Called about once a second with the wall clock: close due windows."""
        return []

    def close(self) -> list[Envelope]:
        """Called once at shutdown: emit whatever is held."""
        return []


class Sink:
    """Delivers envelopes somewhere durable, then acknowledges them.

    The runtime calls ``write`` from the sink's own thread, in order. A sink
    calls ``env.ack()`` once the rows are durable — immediately, or later when
    a buffered file is published or a server answers. ``write`` may block: a
    slow sink slows its queue and, through it, the source. ``flush`` delivers
    everything held and acknowledges it; ``close`` releases resources.
    """

    def __init__(self, config: Any, ctx: Context) -> None:
        self.config = config
        self.ctx = ctx

    def start(self) -> None:
        """Connect, create templates/topics, open files. Errors here stop startup."""

    def write(self, env: Envelope) -> None:
        raise NotImplementedError

    def tick(self, now_ns: int) -> None:
        """Called about once a second: time-based batching and file rolling."""

    def flush(self) -> None:
        """Deliver and acknowledge everything held."""

    def close(self) -> None:
        """Release resources after the final flush."""
