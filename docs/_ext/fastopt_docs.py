"""Sphinx extension for fastopt's pages.

* Points the README's links to repository files that the site shows as
  pages of its own (``CONTRIBUTING.md``) to those pages, when the README is
  included as the front page.
* Runs ``examples/train_digits.py --plot`` once per build (about 3 s), so the
  example's page shows the output and the training curves of the code being
  documented: ``examples/_generated/train_digits.{txt,png}``.
* Links the docstrings' literal names of other projects' objects, such as
  ``torch.optim.Adam``, to their documentation when fastopt_inventories
  lists them.
* Reads the compiled modules' docstrings as reStructuredText: their text
  writes shapes as ``(N, C, *spatial)`` and norms as ``|x|``, which
  reStructuredText would take for emphasis and a substitution, and
  ``Attributes (read only)`` for a section numpydoc does not know.
* Shows the constructor's arguments for fastopt.torch's optimizers, whose
  ``__new__(cls, *args, **kwargs)`` autodoc would show instead.
* Leaves out of the API pages the members of fastopt.torch's classes that
  PyTorch documents: those they inherit from torch (``nn.Module``'s
  methods...), and those they override without changing what they do.
"""
import inspect
import os
import pathlib
import re
import subprocess
import sys
import warnings

import fastopt_inventories

from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)

DOCS = pathlib.Path(__file__).resolve().parents[1]
GENERATED = DOCS / "examples" / "_generated"


# Repository files the README links to -> the page of the site that shows them
# (a path under docs/, which the front page's include makes relative).
SITE_PAGES = {"CONTRIBUTING.md": "docs/contributing.md"}


def link_site_pages(app, relative_path, parent_docname, content):
    """The README's links to files shown as pages, as links to the pages."""
    if pathlib.Path(relative_path).name != "README.md":
        return
    for target, page in SITE_PAGES.items():
        content[0] = content[0].replace(f"]({target})", f"]({page})")


def run_digits_example(app):
    """The digits example's output and plot, written next to its page."""
    GENERATED.mkdir(exist_ok=True)
    script = DOCS.parent / "examples" / "train_digits.py"
    png = GENERATED / "train_digits.png"
    env = dict(os.environ, MPLBACKEND="Agg")
    logger.info("running examples/train_digits.py --plot for its page")
    proc = subprocess.run([sys.executable, str(script), "--plot", str(png)],
                          capture_output=True, text=True, env=env, cwd=DOCS.parent)
    if proc.returncode != 0:
        raise ExtensionError("examples/train_digits.py failed (the docs extra installs "
                             f"scikit-learn and matplotlib):\n{proc.stdout}{proc.stderr}")
    # The plot's path is the build's, not the reader's: leave that line out.
    lines = [ln for ln in proc.stdout.splitlines() if not ln.startswith("training curves saved")]
    (GENERATED / "train_digits.txt").write_text("\n".join(lines) + "\n")


# Plain-text notation in the docstrings' prose -> its reStructuredText spelling.
ESCAPES = [(re.compile(r"(?<!\\)\*spatial"), r"\*spatial"),
           (re.compile(r"(?<!\\)\|x\|"), r"\|x\|")]
INLINE_LITERAL = re.compile(r"(``[^`]+``)")
# ``torch.optim.Adam`` -> a link, for the names the inventories list.
LINKABLE = {name for objects in fastopt_inventories.OBJECTS.values()
            for name, role, _ in objects if role.startswith("py:") and "." in name}
LITERAL_NAME = re.compile(r"``([A-Za-z_][\w.]*)``")
SECTION_NOTE = re.compile(r"^(\s*)Attributes \((.+)\)\s*$")


def literal_link(literal):
    """``name`` -> a link to it, if the inventories list it (``np.x``: numpy.x)."""
    m = LITERAL_NAME.fullmatch(literal)
    if m is None:
        return literal
    name = m[1]
    full = "numpy." + name[3:] if name.startswith("np.") else name
    return f":py:obj:`{name} <{full}>`" if full in LINKABLE else literal


def escape(prose):
    for pattern, repl in ESCAPES:
        prose = pattern.sub(lambda m: repl, prose)
    return prose


def in_literal_blocks(lines):
    """Indices of the lines of the ``::`` literal blocks (shown as they are)."""
    inside, base = set(), None
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if base is not None:
            if not line.strip() or indent > base:
                inside.add(i)
                continue
            base = None
        if line.rstrip().endswith("::"):
            base = indent
    return inside


def plain_to_rst(app, what, name, obj, options, lines):
    """Escape the docstring's plain-text notation and link the literal names
    of other projects' objects, before numpydoc reads it (not in literal
    blocks, which show text as it is)."""
    literal_blocks = in_literal_blocks(lines)
    for i, line in enumerate(lines):
        if i not in literal_blocks:
            parts = INLINE_LITERAL.split(line)       # prose, ``literal``, prose...
            lines[i] = "".join(literal_link(p) if k % 2 else escape(p)
                               for k, p in enumerate(parts))
    for i, line in enumerate(lines[:-1]):
        m = SECTION_NOTE.match(line)
        if m and set(lines[i + 1].strip()) == {"-"}:
            # "Attributes (read only)": the section numpydoc knows, the note before it.
            indent, note = m.groups()
            lines[i:i + 2] = [f"{indent}The attributes are {note}.", "",
                              f"{indent}Attributes", f"{indent}----------"]
            break


def torchs_to_document(obj):
    """Whether PyTorch, not fastopt, documents this class member: torch
    defines it, or fastopt.torch overrides it without a docstring of its own
    (keeping torch's behaviour; autodoc would show torch's docstring)."""
    target = getattr(obj, "fget", None) or getattr(obj, "__func__", None) or obj
    module = getattr(target, "__module__", None) or ""
    if module == "torch" or module.startswith("torch."):
        return True
    return module == "fastopt.torch" and callable(target) and not target.__doc__


def constructor_signature(app, what, name, obj, options, signature, return_annotation):
    """A class's signature from its ``__init__`` where its ``__new__`` only
    passes the arguments on (autodoc prefers ``__new__``)."""
    if what == "class" and signature == "(*args, **kwargs)":
        sig = inspect.signature(obj)
        sig = sig.replace(parameters=[p.replace(annotation=p.empty)
                                      for p in sig.parameters.values()],
                          return_annotation=sig.empty)
        return str(sig), None
    return None


def skip_torch_members(app, what, name, obj, skip, options):
    if what == "class" and torchs_to_document(obj):
        return True
    return None


def setup(app):
    # numpydoc also reads the raw docstring for the signature, and warns about
    # the section that plain_to_rst renames for the page itself.
    warnings.filterwarnings("ignore", r"Unknown section Attributes \(read Only\)", UserWarning)
    app.connect("builder-inited", run_digits_example)
    app.connect("include-read", link_site_pages)
    app.connect("autodoc-skip-member", skip_torch_members)
    app.connect("autodoc-process-signature", constructor_signature, priority=400)
    # Before numpydoc's handler (priority 500) parses the sections.
    app.connect("autodoc-process-docstring", plain_to_rst, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
