"""Kernel drop reasons (enum skb_drop_reason) → Hubble DropReason, where the meaning matches.

Only reasons that say the same thing as a Hubble reason are mapped; every other kernel reason keeps
``drop_reason`` null and is still exported by name in ``kernel_drop_reason``. The table is documented
in docs/agent.md.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# kernel short name -> (Hubble DropReason name, its number in flow.proto)
HUBBLE_DROP_REASONS: dict[str, tuple[str, int]] = {
    "NETFILTER_DROP": ("POLICY_DENIED", 133),
    "NO_SOCKET": ("SOCKET_LOOKUP_FAILED", 178),
    "IP_RPFILTER": ("INVALID_SOURCE_IP", 132),
    "IP_OUTNOROUTES": ("FIB_LOOKUP_FAILED", 169),
    "IP_NOPROTO": ("UNKNOWN_L4_PROTOCOL", 142),
    "PKT_TOO_SMALL": ("INVALID_PACKET_DROPPED", 134),
    "IP_CSUM": ("INVALID_PACKET_DROPPED", 134),
    "TCP_CSUM": ("INVALID_PACKET_DROPPED", 134),
    "UDP_CSUM": ("INVALID_PACKET_DROPPED", 134),
}


def hubble_columns(kernel_names: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """(drop_reason, drop_reason_code) columns for an array of kernel reason names."""
    uniq, inverse = np.unique(np.asarray(kernel_names, dtype=object).astype(str), return_inverse=True)
    names = [HUBBLE_DROP_REASONS.get(u, (None, None))[0] for u in uniq.tolist()]
    codes = [HUBBLE_DROP_REASONS.get(u, (None, None))[1] for u in uniq.tolist()]
    take = pa.array(inverse.reshape(-1).astype(np.int32))
    return (pa.array(names, type=pa.string()).take(take), pa.array(codes, type=pa.uint32()).take(take))
