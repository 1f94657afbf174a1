"""The ``filter`` stage: keep flows by Hubble FlowFilter allow/deny lists.

Filters are written like Hubble's ``flow.FlowFilter`` JSON; the compiler that
evaluates them is :mod:`flowship.model.flowfilter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from flowship.components import Stage
from flowship.model.flowfilter import compile_filter_set, filter_problems
from flowship.stages.columns import filter_rows


@dataclass
class FilterConfig:
    """``type: filter`` — keep flows by Hubble FlowFilter allow/deny lists."""

    allow: list[dict[str, Any]] = field(default_factory=list)
    deny: list[dict[str, Any]] = field(default_factory=list)

    def validate(self) -> list[str]:
        return filter_problems(lambda: compile_filter_set(self.allow, self.deny))


class FilterStage(Stage):
    """Drops the flows that the allow/deny lists reject; counts them by reason."""

    def __init__(self, config: FilterConfig, ctx: Any) -> None:
        super().__init__(config, ctx)
        self._filters = compile_filter_set(config.allow, config.deny)
        self._not_allowed = ctx.metrics.stage_dropped(ctx.name, "not_allowed")
        self._denied = ctx.metrics.stage_dropped(ctx.name, "denied")

    def transform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if batch.num_rows == 0:
            return batch
        allowed, denied = self._filters.evaluate(batch)
        keep = allowed & ~denied
        kept = int(keep.sum())
        if kept == batch.num_rows:
            return batch
        not_allowed = int((~allowed).sum())
        if not_allowed:
            self._not_allowed.inc(not_allowed)
        if batch.num_rows - kept - not_allowed:
            self._denied.inc(batch.num_rows - kept - not_allowed)
        return filter_rows(batch, keep)
