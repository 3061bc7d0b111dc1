"""``python -m fastopt {bench,config,demo} [options]`` and ``python -m fastopt --version``."""
from __future__ import annotations

import importlib
import sys

from ._cli import Parser

PROG = "python -m fastopt"
USAGE = f"""usage: {PROG} [--version] COMMAND [options]

commands:
  bench    time fastopt against NumPy on this machine ({PROG} bench --help)
  config   show the version, SIMD level, OpenMP runtime, threads and build flags
  demo     run the training demo ({PROG} demo --help)

options:
  -h, --help  show this message and exit
  --version   show fastopt's version and exit"""
COMMANDS = ("bench", "config", "demo")


def _error(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns the exit status (2, with a one-line message, for bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        return _error(PROG, f"no command given (choose from {', '.join(COMMANDS)}; see --help)")
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help"):
        print(USAGE)
        return 0
    if command == "--version":
        from . import __version__
        print(f"fastopt {__version__}")
        return 0
    if command == "bench":
        from .bench import main as bench
        return bench(rest, prog=f"{PROG} bench")
    if command == "config":
        Parser(prog=f"{PROG} config",
               description="Show fastopt's version, SIMD level, OpenMP runtime, thread "
                           "count and build flags.").parse_args(rest)
        from . import show_config
        show_config()
        return 0
    if command == "demo":
        try:
            demo = importlib.import_module("fastopt.demo")
        except ModuleNotFoundError as exc:
            if exc.name != "fastopt.demo":
                raise
            return _error(f"{PROG} demo", "the demo is not part of this build of fastopt "
                          "(fastopt.demo is missing)")
        status: int = demo.main(rest)
        return status
    what = "unknown option" if command.startswith("-") else "unknown command"
    return _error(PROG, f"{what} {command!r} (choose from {', '.join(COMMANDS)}, --version; "
                  "see --help)")


if __name__ == "__main__":
    sys.exit(main())
