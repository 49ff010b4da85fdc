"""Entry point of ``python -m data_prep`` and the ``perceiver-data`` console script."""

import sys

from data_prep.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
