"""Triton kernels of fastattn, installed as fastattn.kernels.

One module per op (attention.py, layer_norm.py, ffn.py, decode.py) and _config.py for
the autotune spaces. Modules here import triton; fastattn imports them lazily, only
when the triton backend runs.

This folder sits at the root of the source tree, so wherever that root is on sys.path
(`python -m pytest`, `python -c` run there) it could also be imported as a top-level
package `kernels`, shadowing Hugging Face's `kernels` package, which transformers
imports. It is never that package: imported under a top-level name, this file hands the
import over to the package of that name found on the rest of sys.path or, where there
is none, leaves what the folder would be without this file: an empty namespace package
(PEP 420; no __file__, no submodules), which transformers' probe takes for "not
installed".
"""

if "." not in __name__:
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _tree_root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _elsewhere = [entry for entry in _sys.path
                  if not isinstance(entry, str) or _os.path.realpath(entry or _os.curdir) != _tree_root]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        _spec = _machinery.ModuleSpec(__name__, None, is_package=True)
        _spec.submodule_search_locations = []
    # The import system returns what sys.modules holds under the name once this file has
    # run: the other package (executed here in its place) or the empty namespace package.
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
