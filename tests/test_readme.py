"""Every ```python block of the README runs as written (in order, one namespace)."""
import importlib.util
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    if not README.exists():
        return []
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.skipif(not README.exists(), reason="README.md not next to the tests")
def test_readme_python_blocks_run(capsys):
    blocks = python_blocks()
    assert blocks, "the README shows no Python example"
    namespace = {"__name__": "readme"}
    have_torch = importlib.util.find_spec("torch") is not None
    for block in blocks:
        if not have_torch and re.search(r"^import torch\b", block, flags=re.M):
            continue        # the PyTorch section runs where torch is installed (CI does)
        exec(compile(block, str(README), "exec"), namespace)
