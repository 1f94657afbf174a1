"""``python -m flowship``: the ``flowship`` command, for a checkout or venv without the entry point on PATH."""

import sys

from flowship.cli import main

sys.exit(main())
