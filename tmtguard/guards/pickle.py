"""The pickle guard: every global a pickle names is decided before its module is imported.

Three layers, so that no unpickling in the process goes unchecked:

* ``pickle.{load,loads,Unpickler,_load,_loads,_Unpickler}`` and ``_pickle.{load,loads,Unpickler}`` are
  replaced, so loads through them carry a load frame (the chain). The replacements run the C
  unpickler: full speed.
* the PEP 578 ``pickle.find_class`` event, which CPython raises in both unpicklers before importing the
  module, is the decision point. It also covers references bound before tmtguard started
  (``from _pickle import loads``, ``multiprocessing``'s ``ForkingPickler.loads``).
* subclasses whose ``find_class`` may never call ``super()`` (so never raise the event) get their
  ``find_class`` wrapped: at class creation for subclasses of the guarded classes, and at install for
  subclasses that already exist.

The allowed path is one frozenset lookup of the (module, qualname) tuple the event carries.
"""
from __future__ import annotations

import pickle
import sys
import _pickle
from copyreg import _extension_cache as _ext_cache

from .. import _unpatched, decision, provenance
from ..decision import PickleViolation
from ..policy import can_run_code, suggestion
from . import _audit

_allowed: frozenset = frozenset()
_on = False
_wrapped: list = []  # (class, original find_class) we wrapped, for uninstall

_c_loads = _unpatched.c_loads
_c_load = _unpatched.c_load


def check(module, name) -> None:
    """Decide a global that is not in the global allowlist (the caller did the fast check)."""
    if not _on or provenance.is_internal():
        return
    try:
        chain = provenance.chain()
        policy = decision.state.policy
        if policy.pickle_allowed(module, name, chain) is not None:
            return
        target = f"{module}:{name}"
        frame = chain[-1] if chain else None
        digest = frame.event_digest() if frame is not None else None
        decision.refuse(
            "pickle.global", target,
            f"{target!r} is in no allowlist ({policy.describe_sources()})",
            chain=chain if chain else _unguarded_chain(),
            suggestion=suggestion("pickle", target, frame, digest=digest),
            warning="it can run code: only for an artifact you built yourself" if can_run_code(module, name) else None,
            violation=PickleViolation,
        )
    except decision.Violation:
        raise
    except Exception as exc:  # fail closed in enforce, never break the application in audit
        decision.failed("pickle.global", f"{module}:{name}", exc, violation=PickleViolation)


def _unguarded_chain() -> tuple:
    # An unpickler reached without a frame: a reference bound before tmtguard started, or an
    # application's own Unpickler use. Say so rather than show an empty chain.
    return (provenance.LoadFrame("unpickler bound before tmtguard started", "<unknown>"),)


def _on_find_class(args):
    if args in _allowed:
        return
    check(args[0], args[1])


# --- entry points -----------------------------------------------------------------------------


def _framed(loader, obj, fn, args, kwargs, container=False):
    if _ext_cache:
        _ext_cache.clear()
    top = provenance.adoptable()
    if top is not None:  # the unpickler a container loader (torch.load, numpy.load...) runs
        top.unpickling = True
        try:
            return fn(*args, **kwargs)
        finally:
            top.unpickling = False
    frame, token = provenance.push(loader, obj, container=container)
    return provenance.call_in_frame(frame, token, fn, *args, **kwargs)


_chain_get = provenance._CHAIN.get
_materialized = provenance._materialized
_lazy_enter = provenance._lazy_active.append
_lazy_exit = provenance._lazy_active.pop

# copyreg's EXT cache (code -> object) is process-wide and both unpicklers consult it BEFORE
# find_class: an object one artifact resolved under its scoped rule (or in audit mode, or while the
# guard was off) would be handed to the next artifact with no decision. Every guarded load starts
# with it empty; EXT codes are rare, so this is one dict truth test on the fast path.


def loads(data, /, **kwargs):
    # pickle.loads takes data positionally and the rest by keyword only.
    if _ext_cache:
        _ext_cache.clear()
    if _chain_get():
        return _framed("pickle.loads", data, _c_loads, (data,), kwargs)
    # Top level: no frame unless a decision or a nested load needs one (see provenance.chain()). A
    # global that can act (a built-in that connects or reads, anything only your allowlist names)
    # materializes the frame when it is decided, so what it then does is checked against the load.
    _lazy_enter(None)
    try:
        result = _c_loads(data, **kwargs) if kwargs else _c_loads(data)
    except BaseException as exc:
        _lazy_exit()
        if _materialized:
            provenance.close_lazy(sys._getframe(), exc)
        raise
    _lazy_exit()
    if _materialized:
        provenance.close_lazy(sys._getframe(), None)
    return result


def load(file, /, **kwargs):
    if _ext_cache:
        _ext_cache.clear()
    if _chain_get():
        return _framed("pickle.load", file, _c_load, (file,), kwargs)
    _lazy_enter(None)
    try:
        result = _c_load(file, **kwargs) if kwargs else _c_load(file)
    except BaseException as exc:
        _lazy_exit()
        if _materialized:
            provenance.close_lazy(sys._getframe(), exc)
        raise
    _lazy_exit()
    if _materialized:
        provenance.close_lazy(sys._getframe(), None)
    return result


provenance.register_lazy_loader(loads.__code__, "pickle.loads", "data")
provenance.register_lazy_loader(load.__code__, "pickle.load", "file")


# pickle._loads/_load run a pickle._Unpickler (ours): their frame is a container that unpickler adopts,
# so one load shows as one frame.


def _py_loads(data, /, *args, **kwargs):
    return _framed("pickle._loads", data, _unpatched.pickle_py_loads, (data,) + args, kwargs, True)


def _py_load(file, /, *args, **kwargs):
    return _framed("pickle._load", file, _unpatched.pickle_py_load, (file,) + args, kwargs, True)


class Unpickler(_unpatched.c_Unpickler):
    """``pickle.Unpickler`` under tmtguard: the C unpickler, with a load frame per ``load()``."""

    def __init__(self, file, *args, **kwargs):
        super().__init__(file, *args, **kwargs)
        self._tmtguard_file = file

    def load(self):
        return _framed("pickle.Unpickler", getattr(self, "_tmtguard_file", None),
                       _unpatched.c_Unpickler.load, (self,), {})

    def __setattr__(self, name, value):
        if name == "find_class":
            value = _checked_find_class(value)
        super().__setattr__(name, value)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _wrap_find_class(cls)


class _PyUnpickler(_unpatched.pickle_py_Unpickler):
    """``pickle._Unpickler`` (pure Python; joblib's base) under tmtguard."""

    def __init__(self, file, *args, **kwargs):
        super().__init__(file, *args, **kwargs)
        self._tmtguard_file = file

    def load(self):
        return _framed("pickle._Unpickler", getattr(self, "_tmtguard_file", None),
                       _unpatched.pickle_py_Unpickler.load, (self,), {})

    def __setattr__(self, name, value):
        if name == "find_class":
            value = _checked_find_class(value)
        super().__setattr__(name, value)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _wrap_find_class(cls)


# The replacements answer to the originals' names, so that pickling a reference to them (an artifact
# built while tmtguard is active) writes the same global an unguarded process would.
for _fn, _module, _name in ((loads, "_pickle", "loads"), (load, "_pickle", "load"), (Unpickler, "_pickle", "Unpickler"),
                            (_py_loads, "pickle", "_loads"), (_py_load, "pickle", "_load"),
                            (_PyUnpickler, "pickle", "_Unpickler")):
    _fn.__module__, _fn.__qualname__, _fn.__name__ = _module, _name, _name


def _wrap_find_class(cls) -> None:
    original = cls.__dict__.get("find_class")
    if original is None or getattr(original, "_tmtguard_original", None) is not None:
        return

    def find_class(self, module, name, _original=original):
        # A subclass may never call super().find_class, so the audit event may never fire: decide here.
        if _on and (module, name) not in _allowed:
            check(module, name)
        return _original(self, module, name)

    find_class._tmtguard_original = original
    find_class.__doc__ = getattr(original, "__doc__", None)
    try:
        cls.find_class = find_class
    except TypeError:  # a C type: it cannot be patched, and its find_class is C code we trust
        return
    _wrapped.append((cls, original))


def _checked_find_class(find_class):
    """``unpickler.find_class = f`` on an instance: f replaces the method that raises the audit event
    (both unpicklers look find_class up on the instance), so decide before calling it."""
    if getattr(find_class, "_tmtguard_original", None) is not None:
        return find_class

    def checked(module, name):
        if _on and (module, name) not in _allowed:
            check(module, name)
        return find_class(module, name)

    checked._tmtguard_original = find_class
    return checked


def _existing_subclasses():
    seen = set()
    todo = [_unpatched.c_Unpickler, _unpatched.pickle_py_Unpickler]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
    return seen


_PATCHES = (
    (pickle, "load", load), (pickle, "loads", loads), (pickle, "Unpickler", Unpickler),
    (pickle, "_load", _py_load), (pickle, "_loads", _py_loads), (pickle, "_Unpickler", _PyUnpickler),
    (_pickle, "load", load), (_pickle, "loads", loads), (_pickle, "Unpickler", Unpickler),
)
_ORIGINALS = {
    (pickle, "load"): _unpatched.pickle_load, (pickle, "loads"): _unpatched.pickle_loads,
    (pickle, "Unpickler"): _unpatched.pickle_Unpickler, (pickle, "_load"): _unpatched.pickle_py_load,
    (pickle, "_loads"): _unpatched.pickle_py_loads, (pickle, "_Unpickler"): _unpatched.pickle_py_Unpickler,
    (_pickle, "load"): _unpatched.c_load, (_pickle, "loads"): _unpatched.c_loads,
    (_pickle, "Unpickler"): _unpatched.c_Unpickler,
}


def install(policy) -> None:
    global _allowed, _on
    _allowed = policy.pickle_inert
    _ext_cache.clear()  # resolved while the guard was off, in audit mode or under other rules
    for module, attr, replacement in _PATCHES:
        setattr(module, attr, replacement)
    for cls in _existing_subclasses():
        if cls not in (Unpickler, _PyUnpickler):
            _wrap_find_class(cls)
    _audit.register("pickle.find_class", _on_find_class, _allowed)
    _on = True


def uninstall() -> None:
    global _on
    _on = False
    _audit.unregister("pickle.find_class")
    for (module, attr), original in _ORIGINALS.items():
        setattr(module, attr, original)
    while _wrapped:
        cls, original = _wrapped.pop()
        try:
            cls.find_class = original
        except TypeError:
            pass
