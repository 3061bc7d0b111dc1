"""Every ```python block of the README and of the user guide runs as written
(each document's blocks in order, in one namespace of its own)."""
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide"


def python_blocks(path):
    if not path.exists():
        return []
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def run_blocks(path):
    blocks = python_blocks(path)
    namespace = {"__name__": "readme"}
    have_torch = importlib.util.find_spec("torch") is not None
    for block in blocks:
        if not have_torch and re.search(r"^import torch\b", block, flags=re.M):
            continue        # the PyTorch examples run where torch is installed (CI does)
        exec(compile(block, str(path), "exec"), namespace)


@pytest.mark.skipif(not README.exists(), reason="README.md not next to the tests")
def test_readme_python_blocks_run(capsys):
    assert python_blocks(README), "the README shows no Python example"
    run_blocks(README)


GUIDE_PAGES = sorted(GUIDE.glob("*.md"))


@pytest.mark.skipif(not GUIDE_PAGES, reason="docs/guide not next to the tests")
def test_the_guide_has_examples():
    # The examples that used to be the README's: the training loop, the
    # optimizer objects, PyTorch, low precision.
    with_examples = {p.stem for p in GUIDE_PAGES if python_blocks(p)}
    assert {"quickstart", "optimizers", "torch", "lowprec"} <= with_examples


@pytest.mark.parametrize("page", [p for p in GUIDE_PAGES if python_blocks(p)],
                         ids=lambda p: p.name)
def test_guide_python_blocks_run(page, capsys):
    run_blocks(page)
