#!/usr/bin/env python
"""Check that an sdist holds every tracked file a build or a test needs.

    python tools/check_sdist.py dist/fastopt-0.1.0.tar.gz

The files are those git tracks under src/, tests/, benchmarks/, examples/,
tools/ and docs/, and the top-level build files.  Exit status 1 names the missing
ones (a MANIFEST.in pattern that forgot a kind of file).
"""
import subprocess
import sys
import tarfile

TOP = ["src", "tests", "benchmarks", "examples", "tools", "docs",
       "setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"]


def main(path):
    with tarfile.open(path) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", *TOP], capture_output=True, text=True,
                             check=True).stdout.split()
    missing = [f for f in tracked if f not in names]
    if missing:
        print(f"{path} lacks {len(missing)} tracked files: {', '.join(missing[:10])}",
              file=sys.stderr)
        return 1
    print(f"{path}: all {len(tracked)} tracked files present")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
