"""``python -m ddfast ...`` is the ``ddfast`` command (see :mod:`ddfast.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
