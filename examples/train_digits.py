#!/usr/bin/env python
"""Train a BatchNorm MLP on scikit-learn's handwritten digits with fastopt.

Compares SGD, Momentum, RMSprop and Adam (with learning-rate decay) on
mini-batches; see ``python examples/train_digits.py --help``:

    python examples/train_digits.py                     # the four optimizers
    python examples/train_digits.py --plot curves.png   # and their training curves
    python examples/train_digits.py --search 20         # random search: lr, beta

The same as ``python -m fastopt demo``.  The model and the training loop are
in ``fastopt/demo.py`` (shipped with the package); this needs the examples
extra: ``pip install "fastopt[examples]"`` (scikit-learn, matplotlib).
"""
import sys

from fastopt.demo import main

if __name__ == "__main__":
    sys.exit(main(prog="train_digits.py"))
