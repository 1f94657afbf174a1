"""Source checkpoints that advance only over fully delivered positions.

A source issues one :class:`Receipt` per batch, in read order. Sinks finish
batches in any order; :class:`OrderedAcks` reports the newest position whose
batch *and every earlier batch* completed, which is what may be persisted.
:class:`CheckpointStore` persists it atomically (write, fsync, rename).
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowship.pipeline.envelope import Receipt


class OrderedAcks:
    """Issue receipts in order; call ``on_advance(position)`` as the done prefix grows.

    Receipts complete in the sinks' threads. ``on_advance`` runs outside the lock that
    ``issue`` takes (it may write a file), under a lock of its own, and only with a position
    newer than the last one it was given: a thread that found an older prefix done never
    reports it after a newer one, so the last position persisted is the newest.
    """

    def __init__(self, on_advance: Callable[[Any], None]) -> None:
        self._pending: deque[Receipt] = deque()
        self._lock = threading.Lock()
        self._report_lock = threading.Lock()
        self._on_advance = on_advance
        self._popped = 0  # receipts taken off the done prefix so far
        self._reported = 0  # ``_popped`` when ``on_advance`` was last called
        self.committed: Any = None

    def issue(self, position: Any, rows: int = 0) -> Receipt:
        receipt = Receipt(self._completed, position=position, rows=rows)
        with self._lock:
            self._pending.append(receipt)
        return receipt

    def _completed(self, _receipt: Receipt) -> None:
        advanced = None
        with self._lock:
            while self._pending and self._pending[0].done:
                advanced = self._pending.popleft().position
                self._popped += 1
            if advanced is None:
                return
            self.committed = advanced
            sequence = self._popped
        with self._report_lock:
            if sequence <= self._reported:
                return  # a newer position was reported meanwhile
            self._reported = sequence
            self._on_advance(advanced)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._pending)


class CheckpointStore:
    """A small JSON document per source under ``<data_dir>/checkpoints/``."""

    def __init__(self, data_dir: Path, source_name: str) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in source_name)
        self.path = Path(data_dir) / "checkpoints" / f"{safe}.json"
        self._lock = threading.Lock()

    def load(self) -> dict:
        try:
            state = json.loads(self.path.read_text())
            if not isinstance(state, dict):
                raise ValueError(f"expected a JSON object, got {type(state).__name__}")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"checkpoint {self.path} is unreadable ({exc}); move it away to start over") from None
        return state

    def save(self, state: dict) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name("." + self.path.name + ".tmp")
            with open(tmp, "w") as fh:
                json.dump(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
