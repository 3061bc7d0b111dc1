"""``python -m fastopt.bench`` (the same as ``python -m fastopt bench``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
