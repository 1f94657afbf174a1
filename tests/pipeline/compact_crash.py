"""``flowship compact`` that dies at the Nth change it makes to the archive (fault injection for the crash test).

``FLOWSHIP_CRASH_AT=N``: the Nth call of a store's ``put``, ``rename``, ``delete`` or ``delete_tree`` ends the
process with ``os._exit(137)`` (as SIGKILL would, nothing flushed) — before the change when
``FLOWSHIP_CRASH_WHEN=before``, after it when ``after``. Without the variable it runs normally and prints, on
stderr, how many changes it made (``changes=M``), so a test knows how many crash points there are.
"""

from __future__ import annotations

import os
import sys

from flowship.sinks import parquet_store

CRASH_AT = int(os.environ.get("FLOWSHIP_CRASH_AT", "0"))
AFTER = os.environ.get("FLOWSHIP_CRASH_WHEN", "before") == "after"
changes = 0


def crashing(cls: type, name: str) -> None:
    real = getattr(cls, name)

    def call(self: object, *args: object, **kwargs: object) -> object:
        global changes
        changes += 1
        if changes == CRASH_AT and not AFTER:
            os._exit(137)
        result = real(self, *args, **kwargs)
        if changes == CRASH_AT and AFTER:
            os._exit(137)
        return result

    setattr(cls, name, call)


for store in (parquet_store.LocalStore, parquet_store.S3Store):
    for method in ("put", "rename", "delete", "delete_tree"):
        crashing(store, method)

if __name__ == "__main__":
    from flowship.cli import main

    code = main(sys.argv[1:])
    sys.stderr.write(f"changes={changes}\n")
    sys.exit(code)
