"""The ``filter`` stage: keep flows by Hubble FlowFilter allow/deny lists.

Filters are written like Hubble's ``flow.FlowFilter`` JSON; the compiler that
evaluates them is :mod:`flowship.model.flowfilter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from flowship.model.flowfilter import compile_filter_set, filter_problems
from flowship.stages.columns import MaskStage, Memo, among


@dataclass
class FilterConfig:
    """``type: filter`` — keep flows by Hubble FlowFilter allow/deny lists."""

    allow: list[dict[str, Any]] = field(default_factory=list)
    deny: list[dict[str, Any]] = field(default_factory=list)

    def validate(self) -> list[str]:
        return filter_problems(lambda: compile_filter_set(self.allow, self.deny))


class FilterStage(MaskStage):
    """Drops the flows that the allow/deny lists reject; counts them by reason."""

    def __init__(self, config: FilterConfig, ctx: Any) -> None:
        super().__init__(config, ctx)
        self._filters = compile_filter_set(config.allow, config.deny)
        self._not_allowed = ctx.metrics.stage_dropped(ctx.name, "not_allowed")
        self._denied = ctx.metrics.stage_dropped(ctx.name, "denied")

    def select(self, batch: pa.RecordBatch, alive: np.ndarray | None,
               memo: Memo) -> tuple[pa.RecordBatch, np.ndarray | None]:
        allowed, denied = self._filters.evaluate(batch)  # one verdict per row: dead rows cost, never count
        keep = allowed & ~denied
        not_allowed = int(np.count_nonzero(among(~allowed, alive)))
        if not_allowed:
            self._not_allowed.inc(not_allowed)
        hit = int(np.count_nonzero(among(allowed & denied, alive)))
        if hit:
            self._denied.inc(hit)
        return batch, None if keep.all() else keep
