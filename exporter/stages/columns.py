"""Row selection for the stages that drop flows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def filter_rows(batch: pa.RecordBatch, keep: np.ndarray) -> pa.RecordBatch:
    """``batch`` restricted to the rows where ``keep`` is true.

    Columns that are entirely null (many are, depending on the source) are
    rebuilt as null arrays instead of being filtered: copying rows is the
    main cost of a dropping stage, and a third of the schema is often empty.
    """
    n = batch.num_rows
    kept = int(np.count_nonzero(keep))
    if kept == n:
        return batch
    mask = pa.array(keep, type=pa.bool_())
    arrays = [pa.nulls(kept, col.type) if col.null_count == n else col.filter(mask) for col in batch.columns]
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)
