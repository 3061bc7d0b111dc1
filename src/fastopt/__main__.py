"""``python -m fastopt {bench,config,demo} [options]``."""
import importlib
import sys

USAGE = """usage: python -m fastopt COMMAND [options]

commands:
  bench    time fastopt against NumPy on this machine (python -m fastopt bench --help)
  config   show the version, SIMD level, OpenMP runtime, threads and build flags
  demo     run the training demo (python -m fastopt demo --help)"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from .bench import main as bench
        return bench(rest, prog="python -m fastopt bench")
    if command == "config":
        if rest:
            print(f"python -m fastopt config: error: unexpected arguments {' '.join(rest)}",
                  file=sys.stderr)
            return 2
        from . import show_config
        show_config()
        return 0
    if command == "demo":
        try:
            demo = importlib.import_module("fastopt.demo")
        except ModuleNotFoundError as exc:
            if exc.name != "fastopt.demo":
                raise
            print("python -m fastopt demo: error: the demo is not part of this build of "
                  "fastopt (fastopt.demo is missing)", file=sys.stderr)
            return 2
        return demo.main(rest)
    print(f"python -m fastopt: error: unknown command {command!r} (choose from bench, "
          "config, demo)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
