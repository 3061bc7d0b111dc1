"""``python -m fastopt.bench`` (the same as ``python -m fastopt bench``)."""
import sys

from .cli import main

sys.exit(main())
