"""Row selection for the stages that drop flows.

A stage that only drops rows (and may rewrite columns of the rows it keeps)
is a :class:`MaskStage`: it says which rows to keep instead of copying them.
The runtime runs consecutive mask stages on one batch, ANDs their masks and
copies the surviving rows once, at the end of the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowship.components import Stage

if TYPE_CHECKING:  # Arrow and numpy are imported where rows are computed: a config validates without them
    import numpy as np
    import pyarrow as pa

# Values derived from a batch, shared by the mask stages of one run: name -> (the batch, the values: an array).
Memo = dict[str, tuple[Any, Any]]


def filter_rows(batch: pa.RecordBatch, keep: np.ndarray) -> pa.RecordBatch:
    """``batch`` restricted to the rows where ``keep`` is true.

    Columns that are entirely null (many are, depending on the source) are
    rebuilt as null arrays instead of being filtered: copying rows is the
    main cost of a dropping stage, and a third of the schema is often empty.
    """
    import numpy as np
    import pyarrow as pa

    n = batch.num_rows
    kept = int(np.count_nonzero(keep))
    if kept == n:
        return batch
    mask = pa.array(keep, type=pa.bool_())
    arrays = [pa.nulls(kept, col.type) if col.null_count == n else col.filter(mask) for col in batch.columns]
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def alive_count(alive: np.ndarray | None, n: int) -> int:
    """How many rows a stage sees: all of them, or those ``alive`` still holds."""
    import numpy as np

    return n if alive is None else int(np.count_nonzero(alive))


def among(mask: np.ndarray, alive: np.ndarray | None) -> np.ndarray:
    """``mask`` restricted to the rows still alive (all rows when ``alive`` is None)."""
    return mask if alive is None else mask & alive


def memo_connection_hashes(batch: pa.RecordBatch, memo: Memo) -> np.ndarray:
    """``connection_hashes(batch)``, computed once for all the mask stages that see this very batch."""
    from flowship.model.ids import connection_hashes

    hit = memo.get("connection_hashes")
    if hit is not None and hit[0] is batch:
        return hit[1]
    hashes = connection_hashes(batch)
    memo["connection_hashes"] = (batch, hashes)
    return hashes


class MaskStage(Stage):
    """A stage that drops rows and may rewrite columns of the rows it keeps.

    :meth:`select` sees the whole batch plus ``alive``, the rows that the
    mask stages before it kept (None: all rows). It must decide, count and
    remember exactly as if it had been given only the alive rows; it may
    compute over dead rows when that is cheaper, and what it returns for them
    does not matter. It returns a batch of the same length (the input, or the
    input with columns replaced) and the rows it keeps (None: all of them).
    ``memo`` holds values derived from a batch that later stages may reuse.
    """

    def select(self, batch: pa.RecordBatch, alive: np.ndarray | None,
               memo: Memo) -> tuple[pa.RecordBatch, np.ndarray | None]:
        raise NotImplementedError

    def transform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if batch.num_rows == 0:
            return batch
        batch, keep = self.select(batch, None, {})
        return batch if keep is None else filter_rows(batch, keep)


# Below this share of alive rows the survivors are copied before the next stage: copying a few rows
# costs less than that stage evaluating every dead one (a sampler first, then the other stages).
COMPACT_BELOW = 0.5


def select_through(stages: list[MaskStage], batch: pa.RecordBatch) -> pa.RecordBatch:
    """What the mask stages give one after the other, copying the kept rows once.

    The copy comes earlier only when fewer than ``COMPACT_BELOW`` of the rows
    are left. A stage that would see no rows is not called, as a stage given
    an empty batch does nothing.
    """
    import numpy as np

    alive: np.ndarray | None = None
    memo: Memo = {}
    for stage in stages:
        if alive is not None:
            count = int(np.count_nonzero(alive))
            if count == 0:
                break
            if count < COMPACT_BELOW * batch.num_rows:
                batch, alive = filter_rows(batch, alive), None
        if batch.num_rows == 0:
            break
        batch, keep = stage.select(batch, alive, memo)
        if keep is not None:
            alive = keep if alive is None else alive & keep
    return batch if alive is None else filter_rows(batch, alive)
