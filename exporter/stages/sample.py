"""The ``sample`` stage: keep 1 in N connections, whole, the same way everywhere.

The decision is a pure function of the flow's connection hash
(``flowship.model.ids.connection_hashes``: both directions, L3/L4 and L7
flows of one connection share it), the stage's ``seed`` and the flow's
incoming ``sample_rate``:

    u = mix64(connection_hash XOR mix64(seed * 2^32 + incoming sample_rate))
    keep  <=>  u < floor(2^64 / rate)

so every process, after every restart, keeps the same connections, and a
connection is kept or dropped as a whole. Mixing the incoming sample rate
into the hash makes chained samplers independent: a second ``rate: 10``
stage after a first one really keeps 1 in 100 (with one hash, it would keep
all survivors of the first). A kept flow's ``sample_rate`` is multiplied by
``rate``, so ``sum(sample_rate)`` over kept flows estimates the number of
flows that came in.

Flows matching ``always_keep`` (Hubble filter syntax, see the filter stage)
bypass sampling and keep their ``sample_rate``. The default keeps drops and
errors, HTTP 5xx responses and DNS answers with a non-zero rcode
(``dns_rcode_nonzero: true``, a flowship extension of the filter syntax).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from flowship.model.columns import uint_values
from flowship.model.flowfilter import compile_filter_list, filter_problems
from flowship.model.ids import mix64
from flowship.stages.columns import MaskStage, Memo, among, memo_connection_hashes

DEFAULT_ALWAYS_KEEP: list[dict[str, Any]] = [
    {"verdict": ["DROPPED", "ERROR"]},
    {"http_status_code": ["5+"]},
    {"dns_rcode_nonzero": True},
]

_MAX_RATE = 2**32 - 1


def sample_keep(hashes: np.ndarray, incoming_rate: np.ndarray, rate: int, seed: int = 0) -> np.ndarray:
    """The deterministic keep decision of one sampler, for each flow."""
    if rate <= 1:
        return np.ones(len(hashes), dtype=bool)
    salt_in = (np.uint64(seed & 0xFFFFFFFF) << np.uint64(32)) | incoming_rate.astype(np.uint64)
    u = mix64(hashes.astype(np.uint64) ^ mix64(salt_in))
    threshold = np.uint64((2**64) // rate)
    return u < threshold


@dataclass
class SampleConfig:
    """``type: sample`` — connection-consistent 1-in-``rate`` sampling."""

    rate: int = 10
    always_keep: list[dict[str, Any]] = field(default_factory=lambda: [dict(f) for f in DEFAULT_ALWAYS_KEEP])
    seed: int = 0

    def validate(self) -> list[str]:
        problems = []
        if isinstance(self.rate, int) and not 1 <= self.rate <= _MAX_RATE:
            problems.append(f"rate: expected an integer 1..{_MAX_RATE}, got {self.rate}")
        if isinstance(self.seed, int) and not 0 <= self.seed < 2**32:
            problems.append(f"seed: expected an integer 0..{2**32 - 1}, got {self.seed}")
        problems += filter_problems(lambda: compile_filter_list(self.always_keep, "always_keep"))
        return problems


class SampleStage(MaskStage):
    """Keeps 1 in ``rate`` connections and re-weights the kept flows."""

    def __init__(self, config: SampleConfig, ctx: Any) -> None:
        super().__init__(config, ctx)
        self._always = compile_filter_list(config.always_keep, "always_keep")
        self._dropped = ctx.metrics.stage_dropped(ctx.name, "sampled")
        self._kept_always = ctx.metrics.counter(
            "flowship_sample_always_kept_total",
            "Flows that bypassed sampling because they matched always_keep.", ["stage"]).labels(ctx.name)

    def select(self, batch: pa.RecordBatch, alive: np.ndarray | None,
               memo: Memo) -> tuple[pa.RecordBatch, np.ndarray | None]:
        rate = self.config.rate
        if rate <= 1:
            return batch, None
        incoming = uint_values(batch.column("sample_rate"), fill=1)
        incoming[incoming == 0] = 1
        always = self._always(batch)
        sampled = sample_keep(memo_connection_hashes(batch, memo), incoming, rate, self.config.seed)
        keep = always | sampled
        scaled = np.where(incoming > _MAX_RATE // rate, _MAX_RATE, incoming * rate)  # no int64 overflow
        new_rate = np.where(always, incoming, scaled)
        dropped = int(np.count_nonzero(among(~keep, alive)))
        if dropped:
            self._dropped.inc(dropped)
        kept_always = int(np.count_nonzero(among(always, alive)))
        if kept_always:
            self._kept_always.inc(kept_always)
        names = batch.schema.names
        columns = list(batch.columns)
        columns[names.index("sample_rate")] = pa.array(new_rate.astype(np.uint32), type=pa.uint32())
        return pa.RecordBatch.from_arrays(columns, schema=batch.schema), keep
