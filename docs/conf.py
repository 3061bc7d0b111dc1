"""Sphinx configuration of fastopt's documentation.

Build with the fastopt that Python imports (the installed package, or an
in-place build with ``PYTHONPATH=src``); the pages are read from this
folder, the README is the front page::

    pip install ".[docs]"
    python -m sphinx -W -n -b html docs docs/_build/html

The build needs no network: the objects of other projects that the pages
link to (Python, NumPy, PyTorch, mpi4py) are listed in
``_ext/fastopt_inventories.py``, written out as inventories for intersphinx.
"""
import os
import sys

import fastopt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_ext"))
import fastopt_inventories  # noqa: E402  (from _ext, just put on the path)

project = "fastopt"
author = "the fastopt developers"
copyright = f"2026, {author}"            # as LICENSE
version = release = fastopt.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "myst_parser",
    "fastopt_docs",            # _ext/fastopt_docs.py: runs the digits example for its page
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
templates_path = ["_templates"]

# Warnings are errors in CI (-W), and every cross reference must resolve (-n).
nitpicky = True

# `name` in a docstring links to the object when there is one, else is
# emphasized (the docstrings name parameters that way too), as in NumPy's docs.
default_role = "autolink"

# ---------------------------------------------------------------- API pages ---
autosummary_generate = True
autosummary_imported_members = False
autodoc_typehints = "none"       # the docstrings give the types (numpydoc); no repeating them
autodoc_member_order = "bysource"

numpydoc_show_class_members = False      # the autosummary templates list them
numpydoc_class_members_toctree = False
numpydoc_validation_checks = set()
# The types in "name : type" lines link to their documentation.  The lines are
# prose ("ndarray, float32 or float64, shape (N, C)"): only the words below
# are looked up, every other word is left as it is.
numpydoc_xref_param_type = True
numpydoc_xref_ignore = "all"
numpydoc_xref_aliases = {
    # Python
    "None": "None", "bool": "bool", "int": "int", "float": "float", "str": "str",
    "dict": "dict", "list": "list", "tuple": "tuple", "callable": "callable",
    "sequence": ":term:`python:sequence`", "iterable": ":term:`python:iterable`",
    "file": ":term:`python:file object`",
    # NumPy
    "ndarray": "numpy.ndarray", "array_like": ":term:`numpy:array_like`",
    "dtype": "numpy.dtype", "float16": "numpy.float16", "float32": "numpy.float32",
    "float64": "numpy.float64", "int64": "numpy.int64",
    "Generator": "numpy.random.Generator", "SeedSequence": "numpy.random.SeedSequence",
    # PyTorch, mpi4py
    "Tensor": "torch.Tensor",
    "Intracomm": "mpi4py.MPI.Intracomm",
    # fastopt
    "Optimizer": "fastopt.optim.Optimizer",
}

# The private modules a docstring may name (fastopt._kinds...) have no pages.
nitpick_ignore_regex = [(r"py:.*", r"fastopt\._\w+(\..*)?")]
# BatchNormContext's text names the caller's arrays `x` and `gamma`, which the
# autolink role takes for the context's (undocumented) attributes of that name.
nitpick_ignore = [("py:obj", "x"), ("py:obj", "gamma")]

# ---------------------------------------------------------------- Markdown ---
myst_heading_anchors = 3          # "#a-current-run" links to a section, as on GitHub

# ------------------------------------------------------------------ links ---
# The inventories are written from a table (see fastopt_inventories), not
# fetched: a build that fetched them would fail offline and change as the
# other projects publish.
_inv = os.path.join(os.path.dirname(__file__), "_build", "intersphinx")
fastopt_inventories.write(_inv)
intersphinx_mapping = {
    name: (url, os.path.join(_inv, f"{name}.inv"))
    for name, url in {
        "python": "https://docs.python.org/3/",
        "numpy": "https://numpy.org/doc/stable/",
        "torch": "https://docs.pytorch.org/docs/stable/",
        "mpi4py": "https://mpi4py.readthedocs.io/en/stable/",
    }.items()
}

# ------------------------------------------------------------------- HTML ---
html_theme = "pydata_sphinx_theme"
html_title = f"fastopt {release}"
html_static_path = ["_static"]
html_css_files = ["fastopt.css"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "navbar_align": "left",
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_sidebars = {"index": []}
html_show_sourcelink = False
