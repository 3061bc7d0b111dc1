"""The documentation site: the README is short and links to pages that exist,
and the built site has a page for every public name, a search index that
finds them, and a search page that works.

The site checks read a built site: the one ``FASTOPT_DOCS_HTML`` names (CI
builds it with ``python -m sphinx -W -n``), or else one built here into a
temporary folder, when Sphinx and the docs extra are installed (about 20 s:
marked slow).
"""
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zlib

import pytest

import fastopt

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DOCS_TOOLS = ("sphinx", "numpydoc", "myst_parser", "pydata_sphinx_theme")

needs_docs = pytest.mark.skipif(not (DOCS / "conf.py").exists(),
                                reason="docs/ not next to the tests")


@pytest.mark.skipif(not README.exists(), reason="README.md not next to the tests")
def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move the details to docs/"


@needs_docs
def test_readme_links_to_pages_that_exist():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"the README links to missing files: {missing}"


# ------------------------------------------------------------- the built site

def read_inventory(path):
    """{(domain:role, name)} of a Sphinx objects.inv (version 2)."""
    data = path.read_bytes()
    header, _, body = data.partition(b"zlib.\n")
    assert header.startswith(b"# Sphinx inventory version 2"), header[:40]
    entries = set()
    for line in zlib.decompress(body).decode().splitlines():
        m = re.match(r"(.+?)\s+(\S+:\S+)\s+(-?\d+)\s+(\S*)\s+(.*)", line)
        assert m, line
        entries.add((m[2], m[1]))
    return entries


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    given = os.environ.get("FASTOPT_DOCS_HTML")
    if given:
        return pathlib.Path(given)
    if not (DOCS / "conf.py").exists():
        pytest.skip("docs/ not next to the tests")
    missing = [m for m in DOCS_TOOLS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the docs extra is not installed ({', '.join(missing)})")
    out = tmp_path_factory.mktemp("html")
    build = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-n", "-q", "-b", "html",
                            str(DOCS), str(out)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    return out


def public_names():
    """(fully qualified name, expected role) of every public name documented."""
    import fastopt.distributed
    import fastopt.lr_scheduler
    modules = [fastopt, fastopt.lr_scheduler, fastopt.distributed]
    if importlib.util.find_spec("torch") is not None:
        import fastopt.torch
        modules.append(fastopt.torch)
    for module in modules:
        for name in module.__all__:
            obj = getattr(module, name)
            role = ("py:module" if isinstance(obj, type(fastopt)) else
                    "py:class" if isinstance(obj, type) else "py:function")
            yield f"{module.__name__}.{name}", role


@pytest.mark.slow
def test_every_public_name_has_a_page(site):
    inventory = read_inventory(site / "objects.inv")
    names = list(public_names())
    assert len(names) > 40
    missing = [f"{name} ({role})" for name, role in names if (role, name) not in inventory]
    assert not missing, f"objects.inv lacks: {', '.join(missing)}"
    for name, role in names:
        if role != "py:module":
            assert (site / "api" / "generated" / f"{name}.html").exists(), name


@pytest.mark.slow
def test_the_search_index_knows_the_api(site):
    index = (site / "searchindex.js").read_text()
    for word in ("rmsprop_step", "clip_grad_norm_", "DistributedOptimizer", "BatchNorm2d"):
        assert word in index, word


def browser():
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(b)), None)


@pytest.mark.slow
@pytest.mark.skipif(browser() is None, reason="no headless Chromium")
def test_the_search_page_finds_a_function(site):
    # The search runs in the page's JavaScript: let a headless browser run it.
    page = (site / "search.html").resolve().as_uri() + "?q=rmsprop_step"
    dom = subprocess.run([browser(), "--headless=new", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=10000", "--dump-dom", page],
                         capture_output=True, text=True, timeout=120).stdout
    assert "api/generated/fastopt.rmsprop_step.html" in dom, dom[-2000:]
