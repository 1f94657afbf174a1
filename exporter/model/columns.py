"""Small column helpers the model's decoders and encoders (and the sinks) share."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


def nonempty(arr: pa.Array) -> pa.Array:
    """Empty strings become null: protojson omits them and ECS treats them as absent."""
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)


def nonzero(arr: pa.Array) -> pa.Array:
    """Zeros become null (protojson omits default values)."""
    return pc.if_else(pc.equal(arr, 0), pa.scalar(None, arr.type), arr)
