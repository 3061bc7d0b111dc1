"""What the command lines (``python -m fastopt``, ``bench``, ``demo``) share.

Every error is one line on stderr, ``<prog>: error: <message>``, names the
option, and exits with status 2 -- argparse's own errors too (its default
prints the whole usage block first).  Output files are checked before any
work starts, so a bad ``--plot`` or ``--json`` never costs a finished run.
"""
from __future__ import annotations

import argparse
import os
from typing import NoReturn


class UsageError(Exception):
    """A command-line value that cannot be used (exit status 2); the message
    names the option."""


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line, without the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_writable(path: str, option: str) -> None:
    """Fail now, not after the run, if `path` cannot be written."""
    if os.path.isdir(path):
        raise UsageError(f"{option}: {path} is a directory")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise UsageError(f"{option}: cannot write {path} ({exc.strerror})") from None
    if not existed:
        os.remove(path)


def check_plot(path: str, option: str = "--plot", extra: str = "plot") -> None:
    """`path` can hold a matplotlib figure: matplotlib is installed, the file
    extension names a format it writes, and the file can be written.

    `extra` is the optional-dependency group that installs matplotlib.
    """
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise UsageError(f"{option} needs matplotlib: pip install matplotlib "
                         f"(or pip install 'fastopt[{extra}]')") from None
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    ext = os.path.splitext(path)[1][1:].lower()
    if ext not in formats:
        what = f"'.{ext}' is not an image format" if ext else "no file extension"
        raise UsageError(f"{option}: {path}: {what} (use one of "
                         f"{', '.join('.' + f for f in formats)})")
    check_writable(path, option)
