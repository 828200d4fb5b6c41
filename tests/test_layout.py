"""The source tree's kernels/ folder is fastattn.kernels and nothing else.

It sits at the root of the tree, which `python -m pytest` and `python -c` run there put on
sys.path: a top-level `import kernels` (transformers imports Hugging Face's `kernels`
package so) must reach that package where it is installed, never this folder, and
nothing here may import the folder as `kernels`.
"""

from __future__ import annotations

import importlib.machinery
import os
import pathlib
import re
import subprocess
import sys

from helpers import require_module

ROOT = pathlib.Path(__file__).resolve().parent.parent
TREE_KERNELS = (ROOT / "kernels").resolve()


def _run_at_root(code: str) -> subprocess.CompletedProcess:
    """`python -c code` with the tree's root as the working directory (sys.path[0])."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _hub_kernels_origin():
    """Where a top-level `kernels` package other than this tree's is installed, or None."""
    elsewhere = [p for p in sys.path if pathlib.Path(p or os.curdir).resolve() != ROOT]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    return None if spec is None else pathlib.Path(spec.origin).resolve()


def _is_this_tree(path: str) -> bool:
    return pathlib.Path(path).resolve().is_relative_to(TREE_KERNELS)


def test_import_kernels_at_the_tree_root_is_never_this_tree():
    done = _run_at_root(
        "import kernels, sys\n"
        "print(sys.path[0] in ('', '.'))\n"
        "print(getattr(kernels, '__file__', None), list(getattr(kernels, '__path__', ['-'])) or '[]')\n")
    assert done.returncode == 0, done.stderr
    root_first, imported, search_path = done.stdout.split()
    assert root_first == "True"  # the tree's root was searched first
    hub = _hub_kernels_origin()
    if hub is None:
        # What the folder would be without its __init__.py: an empty namespace package.
        assert imported == "None" and search_path == "[]", done.stdout
    else:
        assert not _is_this_tree(imported) and pathlib.Path(imported).resolve() == hub


def test_transformers_imports_its_kernels_package_not_this_tree():
    """transformers' own probe and import of `kernels` (is_kernels_available, then
    transformers.integrations.hub_kernels, which AttentionInterface pulls in), run from
    the tree's root: it finds Hugging Face's package where installed, else none."""
    require_module("transformers")
    done = _run_at_root(
        "import sys\n"
        "from transformers import AttentionInterface\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "import transformers.integrations.hub_kernels\n"
        "module = sys.modules.get('kernels')\n"
        "print(is_kernels_available(), getattr(module, '__file__', None))\n")
    assert done.returncode == 0, done.stderr[-3000:]
    available, imported = done.stdout.split()[-2:]
    hub = _hub_kernels_origin()
    if hub is None:
        assert available == "False" and imported == "None", done.stdout
    else:
        assert imported == "None" or pathlib.Path(imported).resolve() == hub, imported


def test_fastattn_kernels_is_the_package_of_the_triton_kernels():
    import fastattn.kernels

    assert fastattn.kernels.__name__ == "fastattn.kernels"
    assert (pathlib.Path(fastattn.kernels.__file__).parent / "attention.py").is_file()


TOP_LEVEL_KERNELS_IMPORT = re.compile(r"^\s*(import\s+kernels\b|from\s+kernels\b)|import_module\(\s*['\"]kernels\b",
                                      re.MULTILINE)


def test_no_source_file_imports_the_folder_as_top_level_kernels():
    offenders = []
    for folder in ("python", "tests", "benchmarks", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() == pathlib.Path(__file__).resolve():
                continue
            if TOP_LEVEL_KERNELS_IMPORT.search(path.read_text(encoding="utf-8")):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"import fastattn.kernels, not the top-level `kernels`: {offenders}"
