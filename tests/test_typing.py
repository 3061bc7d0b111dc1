"""The typed API: the usage example runs, the package is marked typed, and
help() shows each compiled function's signature once, under ``fastopt``.

``mypy --strict tests/typing/usage.py`` and ``python -m mypy.stubtest fastopt``
run in CI (.ci/run); they need mypy, which the tests do not."""
import inspect
import pathlib
import pydoc
import re
import runpy

import pytest

import fastopt

HERE = pathlib.Path(__file__).parent
PKG = pathlib.Path(fastopt.__file__).parent
COMPILED = ["adam_step", "adamw_step", "rmsprop_step", "sgd_step", "adagrad_step", "adamax_step",
            "nadam_step", "radam_step", "adadelta_step", "asgd_step", "rprop_step", "lion_step",
            "adafactor_step", "clip_grad_norm_",
            "clip_grad_value_", "batch_norm_forward", "batch_norm_backward", "log_softmax",
            "softmax", "cross_entropy", "take_rows", "ewa_update"]


def test_usage_example_runs():
    runpy.run_path(str(HERE / "typing" / "usage.py"), run_name="usage")


def test_package_is_marked_typed_and_has_stubs_for_every_kernel_module():
    assert (PKG / "py.typed").is_file()
    for name in ("_optim", "_batchnorm", "_softmax", "_train", "_runtime"):
        assert (PKG / f"{name}.pyi").is_file(), name


@pytest.mark.parametrize("name", COMPILED)
def test_help_shows_the_signature_once_under_fastopt(name):
    f = getattr(fastopt, name)
    text = pydoc.render_doc(f, renderer=pydoc.plaintext)
    lines = text.splitlines()
    assert lines[0].endswith("in module fastopt"), lines[0]
    # the signature, from the function itself, once; no copy embedded in the docstring
    assert lines.count(f"{name}{inspect.signature(f)}") == 1, text[:600]
    assert not re.fullmatch(rf"{name}\(.*\)", f.__doc__.splitlines()[0].strip())
    assert "_avx" not in text and "_baseline" not in text
