"""The import guard: a module guarded loads or model code newly import is decided before its code runs.

* A ``sys.meta_path`` finder, kept first, is consulted for every module not yet in ``sys.modules``.
  Outside guarded loads and model code it returns at once. Inside, it finds the module's spec with
  the finders behind it (so it knows where the module lives), decides, and hands that spec back: an
  allowed import costs no second search.
* Backstops for a finder that was removed or bypassed: the PEP 578 ``import`` event (raised by the
  ``import`` statement before any finder runs) puts the finder back and reports ``guard.tamper``; the
  ``exec`` event of a module body that no finder decided (``spec_from_file_location`` +
  ``exec_module``; the code guard owns that event and hands module bodies here) decides that module
  before its body runs.

An import is allowed when:

1. the module lives in a model-code folder (a torch hub folder, a remote-code module folder): it is
   the artifact's own code, and is registered as model code of that folder's chain (a native
   extension there is a ``native.load``, not an import);
2. ``imports.allow`` or the built-in list (``allowlists/imports.yaml``) names it (``pkg`` or ``pkg.*``);
3. an installed distribution imports its own modules or one of its declared dependencies (torch
   importing sympy): the requester is the innermost frame outside tmtguard, the import machinery and
   the standard library, and it is installed code, not model code.

Everything else is refused (``import``, :class:`~tmtguard.decision.ImportViolation`).
"""
from __future__ import annotations

import os
import re
import sys
import threading
from importlib.machinery import EXTENSION_SUFFIXES

from .. import _unpatched, decision, provenance
from ..decision import ImportViolation, NativeViolation
from ..policy import builtin_allowlist_files
from . import _audit, _scope

_on = False
_policy = None
_tls = threading.local()  # busy: our own search is running; decided: {module name} this thread allowed

_chain = _scope._chain
_lazy = _scope._lazy
_model_code = _scope._model_code
_wide = _scope.wide
_code_of = provenance.code_of  # frame.f_code without an audit event


class ImportGuard:
    """tmtguard's ``sys.meta_path`` entry."""

    def find_spec(self, name, path=None, target=None):
        if not _chain() and not _model_code and not _wide.on:
            return None
        return _decide(name, path, target)

    def __repr__(self) -> str:
        return "<tmtguard import guard>"


finder = ImportGuard()


def _decide(name, path, target):
    if not _on or getattr(_tls, "busy", False):
        return None
    if target is None and not _importing(provenance.frame_at(2)):
        return None  # importlib.util.find_spec probing: nothing runs (exec_module is decided later)
    chain = _scope.checked_chain()
    if chain is None:
        return None
    if target is not None:
        from . import tamper

        tamper.check_reload(name)
    _tls.busy = True
    try:
        spec = _find_behind(name, path, target)
    finally:
        _tls.busy = False
    if spec is None:
        return None  # not installed: the usual ModuleNotFoundError
    try:
        allowed = _allowed(name, spec, chain)
    except decision.Violation:
        raise
    except Exception as exc:
        decision.failed("import", name, exc, violation=ImportViolation)
        return spec
    if allowed:
        _mark_decided(name)
        return spec
    _refuse(name, spec, chain)
    _mark_decided(name)  # audit: it goes on
    return spec


def _importing(f) -> bool:
    """True when the import machinery above is importing (not only finding) a module."""
    while f is not None and _scope.in_import_machinery(f):
        if _code_of(f).co_name in ("_find_and_load_unlocked", "_find_and_load"):
            return True
        f = f.f_back
    return False


def _find_behind(name, path, target):
    """The spec the finders after ours would produce."""
    meta_path = sys.meta_path
    try:
        start = next(i for i, f in enumerate(meta_path) if f is finder) + 1
    except StopIteration:
        start = 0
    for other in list(meta_path[start:]):
        find = getattr(other, "find_spec", None)
        if find is None:
            continue
        spec = find(name, path, target)
        if spec is not None:
            return spec
    return None


def _location(spec) -> str | None:
    origin = getattr(spec, "origin", None)
    if origin and os.path.isabs(origin):
        return provenance.realpath(origin)
    locations = getattr(spec, "submodule_search_locations", None)
    if locations:
        for loc in locations:
            return provenance.realpath(loc) + os.sep
    return None


def _allowed(name: str, spec, chain) -> bool:
    if name.startswith("transformers_modules") and (len(name) == 20 or name[20] == "."):
        # transformers' modules cache: a package's __init__ must be the empty file transformers made, a
        # module a copy of the model's code (checked as it is imported; refused like a modified copy)
        from . import transformers as remote

        if remote.cache_module(name, spec, chain):
            return True
    where = _location(spec)
    if where is not None:
        folder_chain = provenance.model_folder_chain(where)
        if folder_chain is not None or _parent_of_model_folder(where):
            if where.endswith(tuple(EXTENSION_SUFFIXES)):
                from . import native

                native.check_library(where, chain, via="import of a native extension from a model folder")
                return True
            if folder_chain is not None and spec.origin and os.path.isabs(spec.origin):
                provenance.register_model_code(spec.origin, folder_chain)
            return True
    if _policy.import_allowed(name, chain) is not None:
        return True
    if _resolving_pickle_global():
        return True
    return _dependency_of_requester(name)


def _resolving_pickle_global() -> bool:
    """An unpickler importing the module of a global: the pickle guard decided that exact global
    (``pickle.allow`` names it) before the import, on the ``pickle.find_class`` event."""
    f = provenance.frame_at(2)
    while f is not None and (_code_of(f).co_filename in _OWN_FILES or _scope.in_import_machinery(f)):
        f = f.f_back
    if f is None:
        return False
    if _code_of(f).co_filename == _PICKLE_GUARD:
        return True  # the C unpickler's find_class, under tmtguard's pickle entry points
    if _code_of(f).co_name == "find_class":
        unpickler = f.f_locals.get("self")
        return isinstance(unpickler, (_unpatched.c_Unpickler, _unpatched.pickle_py_Unpickler))
    return False


def _parent_of_model_folder(where: str) -> bool:
    # a package __init__ (or namespace folder) above a model-code folder: transformers_modules/org/...
    if not where.endswith(os.sep + "__init__.py") and not where.endswith(os.sep):
        return False
    package_dir = os.path.dirname(where) if not where.endswith(os.sep) else where.rstrip(os.sep)
    package_dir += os.sep
    return any(folder.startswith(package_dir) for folder in provenance._model_folders)


def _refuse(name: str, spec, chain) -> None:
    where = getattr(spec, "origin", None) or "?"
    top = name.partition(".")[0]
    _scope.refuse(
        "import", name,
        f"tried to import {name!r} ({where}), which no imports.allow rule nor the built-in list names "
        f"({_policy.describe_sources()})",
        chain, section="imports", entry=name if "." not in name else f"{top}.*",
        violation=ImportViolation, detail={"module": name, "file": where},
    )


def _mark_decided(name: str) -> None:
    decided = getattr(_tls, "decided", None)
    if decided is None:
        decided = _tls.decided = set()
    decided.add(name)


def _take_decided(name: str) -> bool:
    decided = getattr(_tls, "decided", None)
    if decided and name in decided:
        decided.discard(name)
        return True
    return False


# --- rule 3: an installed distribution importing its own modules or declared dependencies ----------


def requester():
    """The frame that asked for the import: the innermost one outside tmtguard's guards, the import
    machinery and the standard library (``importlib.import_module``, ``pkgutil`` import for someone)."""
    f = provenance.frame_at(1)
    while f is not None:
        filename = _code_of(f).co_filename
        if filename.startswith(_scope._OWN_DIR):
            if not filename.startswith(_GUARDS_DIR):
                return f  # tmtguard's own work (its telemetry importing opentelemetry)
        elif not provenance._stdlib_file(filename):
            return f
        f = f.f_back
    return None


_GUARDS_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_PICKLE_GUARD = os.path.join(_GUARDS_DIR, "pickle.py")
_OWN_FILES = frozenset(os.path.join(_GUARDS_DIR, f) for f in ("imports.py", "_scope.py", "code.py", "tamper.py"))
_dependencies: dict = {}  # distribution name -> frozenset of top-level module names it may import
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _dependency_of_requester(name: str) -> bool:
    f = requester()
    if f is None:
        return False
    filename = _code_of(f).co_filename
    if filename.startswith(_scope._OWN_DIR):
        return True
    if _scope.is_model_code(f) or not _scope.installed(filename):
        return False
    dist = provenance.distribution_of(filename)
    if not dist:
        return False
    return name.partition(".")[0] in _importable_by(dist["name"])


def _importable_by(dist_name: str) -> frozenset:
    tops = _dependencies.get(dist_name)
    if tops is None:
        with provenance.internal():
            tops = _dependencies[dist_name] = _compute_importable(dist_name)
    return tops


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _compute_importable(dist_name: str) -> frozenset:
    import importlib.metadata as md

    provenance.distribution_of(__file__)  # fills provenance's top-level map
    by_dist: dict = {}
    for top, dists in (provenance._top_level_dists or {}).items():
        for d in dists:
            by_dist.setdefault(_norm(d), set()).add(top)
    names = {_norm(dist_name)}
    try:
        for req in md.requires(dist_name) or ():
            m = _REQUIREMENT.match(req)
            if m:
                names.add(_norm(m.group(1)))
    except Exception:
        pass
    tops = set()
    for n in names:
        tops.update(by_dist.get(n, ()))
        tops.add(n.replace("-", "_"))
    return frozenset(tops)


# --- backstops -------------------------------------------------------------------------------------


def _on_import_event(args):
    if not _chain() and not _model_code and not _wide.on:
        return
    if not _on or _lazy.internal:
        return
    meta_path = sys.meta_path
    if not meta_path or meta_path[0] is not finder:
        from . import tamper

        present = any(f is finder for f in meta_path)
        restore_finder()
        if not present and _scope.checked_chain() is not None:
            tamper.refuse("sys.meta_path", "tmtguard's import guard was removed from sys.meta_path "
                          "(put back; the import that followed is still checked)")


def module_exec(code, f) -> None:
    """The ``exec`` event of a module body, run by the import machinery frame ``f`` (the code guard,
    which owns that event, hands it over). Decides a module no finder decided."""
    if not _on:
        return
    module = None
    g = f
    while g is not None and _scope.in_import_machinery(g):
        candidate = g.f_locals.get("module")
        if candidate is not None and hasattr(candidate, "__spec__"):
            module = candidate
            break
        g = g.f_back
    if module is None:
        return
    name = getattr(module, "__name__", None) or "?"
    if _take_decided(name):
        return
    from . import tamper

    model_code = code.co_filename in _model_code
    if model_code and not tamper.reload_protected(name):
        return  # model code being imported (torch hub's hubconf, remote code): registered by its loader
    chain = _scope.checked_chain()
    if chain is None:
        return
    tamper.check_module_exec(name, code)
    if model_code:
        return
    spec = module.__spec__
    if spec is None or _allowed(name, spec, chain):
        return
    _refuse(name, spec, chain)


def restore_finder() -> None:
    meta_path = sys.meta_path
    for i in range(len(meta_path) - 1, -1, -1):
        if meta_path[i] is finder:
            list.__delitem__(meta_path, i)
    list.insert(meta_path, 0, finder)


# --- install / uninstall ---------------------------------------------------------------------------


_trusted_tops = None  # top-level names of the built-in frameworks and their dependencies, transitively


def _trusted_framework(module: str) -> bool:
    """A module of the built-in import list (stdlib, the frameworks) or of a distribution those
    frameworks depend on, transitively (torch -> sympy -> mpmath): its start-up is its own."""
    global _trusted_tops
    policy = _policy
    if policy is None:
        return False
    src = policy.import_allowed(module, ())
    builtin = builtin_allowlist_files()
    if src is not None and src.file in builtin:
        return True
    if _trusted_tops is None:
        frameworks = {k[:-2] for k, v in policy.base.imports.items() if v.file in builtin and k.endswith(".*")}
        with provenance.internal():
            _trusted_tops = frozenset(_closure(frameworks))
    return module.partition(".")[0] in _trusted_tops


def _closure(tops) -> set:
    provenance.distribution_of(__file__)  # fills provenance's top-level map
    dists = set()
    for top in tops:
        dists.update(_norm(d) for d in (provenance._top_level_dists or {}).get(top, ()))
    seen, out = set(), set(tops)
    while dists:
        d = dists.pop()
        if d in seen:
            continue
        seen.add(d)
        importable = _importable_by(d)
        out.update(importable)
        for top in importable:
            dists.update(_norm(x) for x in (provenance._top_level_dists or {}).get(top, ()))
    return out


def install(policy) -> None:
    global _on, _policy, _trusted_tops
    _policy = policy
    _trusted_tops = None
    provenance.trusted_start_up = _trusted_framework
    _scope.configure()
    restore_finder()
    _audit.register("import", _on_import_event, scope=_audit.WIDE)
    _on = True


def uninstall() -> None:
    global _on
    _on = False
    provenance.trusted_start_up = None
    _audit.unregister("import")
    meta_path = sys.meta_path
    for i in range(len(meta_path) - 1, -1, -1):
        if meta_path[i] is finder:
            list.__delitem__(meta_path, i)
