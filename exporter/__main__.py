"""``python -m flowship``: the ``flowship`` command, for a checkout or venv without the entry point on PATH."""

import sys

from flowship.cli import main

if __name__ == "__main__":  # importing the module (a walk over every module of the package) runs nothing
    sys.exit(main())
