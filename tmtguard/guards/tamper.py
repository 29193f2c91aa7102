"""Tamper resistance: guarded loads and model code cannot switch tmtguard off or loosen it.

Refused as ``guard.tamper`` (:class:`~tmtguard.decision.TamperViolation`) while a chain is acting:

* setting or removing any ``TMTGUARD_*`` environment variable (``os.putenv``/``os.unsetenv`` events,
  so ``os.environ[...] = ...`` fails before the environment changes);
* ``tmtguard.activate()`` / ``deactivate()`` (checked in activation);
* assigning or deleting attributes of tmtguard's own modules and of ``decision.state``; assigning
  over a tmtguard patch (``pickle.loads = _pickle.loads``, ``socket.socket.connect = ...``);
  assigning ``sys.meta_path``; swapping a guarded module's ``__class__`` back. The modules holding
  patches get a ``ModuleType`` subclass whose ``__setattr__`` checks, and the ``object.__setattr__``
  event covers ``__class__`` assignment through ``object.__setattr__``;
* removing the import guard from ``sys.meta_path`` (a ``list`` subclass that also keeps the guard
  first; ``insert(0, finder)`` lands right behind it);
* ``importlib.reload`` of ``pickle``, ``socket``, ``subprocess``, ``os`` and the other modules
  tmtguard patches, or of tmtguard itself.

What gets past those (``vars(module)[name] = ...``, ``object.__setattr__`` on a module, a class
attribute set on a patched class) is caught after the fact: :func:`verify`, run before each
decision of the import, process, code, native and file guards, puts every patch, the import guard,
the audit handlers and the mode back and reports what it found. The action being decided is then
decided as usual, and the PEP 578 hook (which cannot be removed) decides whatever the patches
covered meanwhile.
"""
from __future__ import annotations

import os
import sys
import threading
import types

from .. import decision, provenance
from ..decision import TamperViolation
from . import _audit, _scope

_on = False
_tls = threading.local()

_chain = _scope._chain
_lazy = _scope._lazy
_model_code = _scope._model_code

# Modules whose attributes hold tmtguard's patches (or its switches): they get GuardedModule.
# Not sys (importlib makes every new module with type(sys)(name) and checks isinstance(m, type(sys)))
# nor pickle (joblib.hash tells modules apart with type(x) is type(pickle)): their patches are put back
# by verify() instead, and the pickle.find_class audit event decides every global meanwhile.
WATCHED = ("_pickle", "os", "posix", "socket", "_socket", "ssl", "subprocess", "_posixsubprocess",
           "pty", "threading", "ctypes", "_ctypes", "marshal", "importlib")
RELOAD_PROTECTED = frozenset(WATCHED) | {"sys", "pickle", "copyreg", "builtins", "io", "_io", "shutil",
                                         "multiprocessing", "cffi"}

_snapshot: list = []  # (owner, attribute, value) as sealed
_guards: list = []  # the guard modules, as sealed
_handlers: dict = {}  # audit handlers as sealed
_handlers_snapshot: list = [None]  # _audit.snapshot() when they were last known intact
_guarded_modules: list = []  # modules whose class we set
_guarded_ids: set = set()  # id() of each of them (the list keeps them alive): the setattr handler's test
# Watched modules whose class is left alone: application code reads their attributes on hot paths
# (os.path, os.fspath, socket.AF_INET), and CPython 3.11 specializes attribute reads only on plain
# modules: a GuardedModule class made every `os.x` in the process several times slower. Their
# patches are checked by identity before every decision (verify) and put back; the PEP 578 events
# behind each of them decide what an unpatched function would do.
# _socket holds no patch, but socket.py reads _socket.socket in every socket.__init__.
UNPINNED = frozenset({"os", "socket", "_socket", "threading", "importlib"})
_plain_modules: list = []
_module_class: dict = {}  # module -> the GuardedModule (sub)class it was given


def acting():
    """The acting chain (a guarded load, model code, or a thread either started), else None."""
    if _lazy.internal:
        return None
    chain = provenance.acting_chain()
    if chain is None:
        from . import threads

        chain = threads.thread_chain()
    return chain


def refuse(target: str, rule: str, chain=None):
    """Report a tamper attempt: raise TamperViolation in enforce, record it in audit."""
    if chain is None:
        chain = acting() or ()
    return decision.refuse("guard.tamper", target, f"{_scope.who(chain)} {rule}" if chain else rule,
                           chain=chain, violation=TamperViolation, origin=provenance.origin(2))


# --- module and state attributes -------------------------------------------------------------------


_CALLABLES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type) + (
    (_audit._fast.Gated,) if _audit._fast is not None else ())  # a patch behind a C gate (network)


def _tmtguard_object(value) -> bool:
    if not isinstance(value, _CALLABLES):
        return False  # never getattr() an arbitrary object (ctypes.pythonapi.x is a symbol lookup)
    if getattr(value, "_tmtguard_original", None) is not None:
        return True
    module = getattr(value, "__module__", None)
    if isinstance(module, str) and (module == "tmtguard" or module.startswith("tmtguard.")):
        return True
    # a patch may wear its original's __module__ (the pickle guard's loads says "_pickle"): its code
    # still lives in tmtguard's files
    if isinstance(value, types.FunctionType):
        return value.__code__.co_filename.startswith(_scope._OWN_DIR)
    if isinstance(value, type):
        return id(value) in _replacement_ids  # a class tmtguard put in place (pickle.Unpickler)
    return False


_replacement_ids: set = set()  # id() of the objects the guards set as patches, refreshed at seal


def _protected(owner, name: str) -> bool:
    if name == "__class__":
        # Only the modules tmtguard guards (and its state). importlib builds every new module as
        # type(sys)(name), so all of them share sys's guarded class: a library swapping the class of
        # its own module (torch's config modules do) is not tampering.
        return owner is decision.state or id(owner) in _guarded_ids
    modname = getattr(owner, "__name__", "") if isinstance(owner, types.ModuleType) else ""
    if modname == "tmtguard" or modname.startswith("tmtguard."):
        return True
    if owner is sys and name in ("meta_path", "modules", "path_hooks", "path_importer_cache"):
        return True
    try:
        current = object.__getattribute__(owner, name) if isinstance(owner, types.ModuleType) else owner.__dict__.get(name)
    except AttributeError:
        return False
    return _tmtguard_object(current)


class GuardedModule(types.ModuleType):
    """A module tmtguard patched (or tmtguard's own): code acting for a load cannot rebind its guards."""

    def __new__(cls, *args, **kwargs):
        # type(os)(name) makes a plain module, as it did before tmtguard
        return types.ModuleType(*args, **kwargs)

    def __setattr__(self, name, value):
        if (_chain() or _model_code or _threads_started) and _on \
                and not _lazy.internal and _protected(self, name) and acting() is not None:
            refuse(f"{self.__name__}.{name}", f"tried to assign {self.__name__}.{name}, which tmtguard guards")
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if (_chain() or _model_code or _threads_started) and _on \
                and not _lazy.internal and _protected(self, name) and acting() is not None:
            refuse(f"{self.__name__}.{name}", f"tried to delete {self.__name__}.{name}, which tmtguard guards")
        super().__delattr__(name)


_threads_started = False  # a thread carrying a chain exists (the fast test above must not miss it)


def _pinned(module, name: str, value) -> property:
    """A patch pinned on its module's class. A data descriptor on the type is found before the
    module's ``__dict__``, so writing the dict directly (``vars(module)[name] = original``) does not
    unpatch ``module.name`` nor ``from module import name``; assigning goes through the setter.

    The getter is a dict's C ``get`` bound to a one-entry dict keyed by the module: reading
    ``pickle.loads`` costs a C call, not a Python ``__get__`` (every unpickle reads it)."""
    store = {module: value}

    def fset(obj, new):
        if _on and not _lazy.internal and acting() is not None:
            refuse(f"{obj.__name__}.{name}", f"tried to assign {obj.__name__}.{name}, which tmtguard guards")
        store[obj] = new
        obj.__dict__[name] = new

    def fdel(obj):
        if _on and not _lazy.internal and acting() is not None:
            refuse(f"{obj.__name__}.{name}", f"tried to delete {obj.__name__}.{name}, which tmtguard guards")
        store[obj] = None
        obj.__dict__.pop(name, None)

    return property(store.get, fset, fdel)


def _pin(module) -> None:
    """Give ``module`` a GuardedModule class of its own, pinning the tmtguard patches it holds."""
    pinned = {attr: _pinned(module, attr, value) for attr, value in list(vars(module).items())
              if _tmtguard_object(value) and not isinstance(value, types.ModuleType)}
    cls = type("GuardedModule", (GuardedModule,), {"__slots__": (), **pinned}) if pinned else GuardedModule
    object.__setattr__(module, "__class__", cls)
    _module_class[module] = cls


def _guard_state_class():
    base = type(decision.state)
    if getattr(base, "_tmtguard_guarded", False):
        return

    class GuardedState(base):
        _tmtguard_guarded = True

        def __setattr__(self, name, value):
            if _on and not _lazy.internal and acting() is not None:
                refuse(f"tmtguard.decision.state.{name}", "tried to change tmtguard's mode or policy")
            super().__setattr__(name, value)

    GuardedState.__name__ = GuardedState.__qualname__ = base.__name__
    decision.state.__class__ = GuardedState


def _on_object_setattr(args):
    if not _chain() and not _model_code and not _threads_started:
        return
    owner, name = args[0], args[1]
    if not _on or _lazy.internal or not isinstance(name, str):
        return
    # identity, not ==: a module class of someone else's (torch's ConfigModule) may define __eq__
    guarded = owner is decision.state or id(owner) in _guarded_ids
    if guarded and _protected(owner, name) and acting() is not None:
        refuse(f"{getattr(owner, '__name__', type(owner).__name__)}.{name}",
               f"tried object.__setattr__ on {name!r} of a module tmtguard guards")


# --- environment -----------------------------------------------------------------------------------


def _on_env(args):
    provenance.environment_changes[0] += 1  # the file guard's settings are derived from it
    if not _chain() and not _model_code and not _threads_started:
        return
    key = args[0]
    key = key.decode("utf-8", "replace") if isinstance(key, (bytes, bytearray)) else str(key)
    if key.upper().startswith("TMTGUARD_") and _on and acting() is not None:
        refuse(f"os.environ[{key!r}]", f"tried to change {key} (the environment tmtguard starts from)")


# --- sys.meta_path ---------------------------------------------------------------------------------


def _finder():
    from . import imports

    return imports.finder


class MetaPath(list):
    """``sys.meta_path`` while tmtguard is on: the import guard stays in it, first."""

    def _check_keeps(self, remaining) -> None:
        f = _finder()
        if any(x is f for x in self) and not any(x is f for x in remaining) and _on and acting() is not None:
            refuse("sys.meta_path", "tried to remove tmtguard's import guard from sys.meta_path")

    def remove(self, value):
        if value is _finder():
            self._check_keeps([x for x in self if x is not value])
        return super().remove(value)

    def pop(self, index=-1):
        if len(self) and self[index] is _finder():
            self._check_keeps([])
        return super().pop(index)

    def clear(self):
        self._check_keeps([])
        return super().clear()

    def __delitem__(self, index):
        rest = list(self)
        del rest[index]
        self._check_keeps(rest)
        return super().__delitem__(index)

    def __setitem__(self, index, value):
        rest = list(self)
        rest[index] = value
        self._check_keeps(rest)
        return super().__setitem__(index, value)

    def insert(self, index, value):
        if value is not _finder() and len(self) and self[0] is _finder():
            if index < 0:
                index += len(self)
            index = max(index, 1)  # behind the import guard, which decides first and asks the rest
        return super().insert(index, value)


def _install_meta_path() -> None:
    if type(sys.meta_path) is not MetaPath:
        guarded = MetaPath(sys.meta_path)
        types.ModuleType.__setattr__(sys, "meta_path", guarded)


# --- reloads ---------------------------------------------------------------------------------------


def check_reload(name: str) -> None:
    if name in RELOAD_PROTECTED or name == "tmtguard" or name.startswith("tmtguard."):
        refuse(f"importlib.reload({name})", f"tried to reload {name!r}, which would drop tmtguard's patches")


def reload_protected(name: str) -> bool:
    return name in RELOAD_PROTECTED or name.startswith("tmtguard")


def check_module_exec(name: str, code) -> None:
    """A module body re-executed in place (a reload that got past the import guard)."""
    module = sys.modules.get(name)
    if module is None or not reload_protected(name):
        return
    if getattr(module, "__file__", None) == code.co_filename and _populated(module):
        check_reload(name)


def _populated(module) -> bool:
    """A module whose body already ran (a reload), not one the import system just created for its
    first import (only the dunder attributes importlib sets)."""
    return any(not k.startswith("__") for k in vars(module))


# --- verify: put back what got past the checks ------------------------------------------------------


def _expected() -> list:
    """(owner, attribute, value) tmtguard keeps in place right now. Rebuilt only when a guard's patch
    list changes size (a guard patches a library imported later) or the pickle guard turns on or off."""
    pickle_guard = sys.modules.get("tmtguard.guards.pickle")
    key = (pickle_guard is not None and pickle_guard._on, tuple(map(len, _patch_lists)))
    if _expected_cache[0] == key:
        return _expected_cache[1]
    out = list(_snapshot)
    for patched in _patch_lists:
        for entry in patched:
            if len(entry) == 4:
                owner, attr, _original, replacement = entry
                out.append((owner, attr, replacement))
    if key[0]:
        out.extend(pickle_guard._PATCHES)
    _expected_cache[:] = [key, out]
    return out


_identical = getattr(_audit._fast, "identical", None)
_imports = None  # tmtguard.guards.imports, as sealed

_expected_cache: list = [None, ()]
_patch_lists: list = []  # each guard's _patched list, as sealed
_module_pairs: list = []  # (module, the class it must keep), as sealed


def verify() -> None:
    """Called before each decision of the import, process, code, native and file guards: undo
    tampering that got past the checks, report it. Runs on every such decision, so the all-intact
    case is a handful of identity tests per patch and nothing else."""
    if not _on or getattr(_tls, "busy", False):
        return
    _tls.busy = True
    try:
        found = []
        expected = _expected()
        # the dicts themselves (a pinned attribute hides them), compared by identity; in C when built
        if _identical is None or _identical(expected, _module_pairs) != -1:
            for owner, attr, value in expected:
                if vars(owner).get(attr) is not value:
                    found.append((owner, attr, value))
            classes_ok = all(type(module) is cls for module, cls in _module_pairs)
        else:
            classes_ok = True
        handlers_ok = _audit.intact(_handlers_snapshot[0])
        meta_path = sys.meta_path
        f = _imports.finder if _imports is not None else _finder()
        meta_ok = bool(meta_path) and meta_path[0] is f
        settings = _active_settings()
        mode_ok = settings is None or decision.state.mode == settings.mode
        if found or not (handlers_ok and meta_ok and classes_ok and mode_ok):
            _repair(found, handlers_ok, meta_ok, classes_ok, mode_ok, settings)
    finally:
        _tls.busy = False


def _repair(patches, handlers_ok, meta_ok, classes_ok, mode_ok, settings) -> None:
    found = []
    with provenance.internal():
        for owner, attr, value in patches:
            _force_set(owner, attr, value)
            found.append(f"{getattr(owner, '__name__', owner)}.{attr}")
        if not handlers_ok:
            for event, entry in _handlers.items():
                if _audit.restore(event, entry):
                    found.append(f"audit handler {event}")
            _audit.reapply()
            _handlers_snapshot[0] = _audit.snapshot()
        if not meta_ok:
            f = _finder()
            if not any(x is f for x in sys.meta_path):
                found.append("sys.meta_path")
            from . import imports

            imports.restore_finder()
        if not classes_ok:
            for module, cls in _module_pairs:
                if type(module) is not cls:
                    object.__setattr__(module, "__class__", cls)
                    found.append(f"{module.__name__}.__class__")
        if not mode_ok:
            object.__setattr__(decision.state, "mode", settings.mode)
            found.append("tmtguard mode")
    if found:
        found = list(dict.fromkeys(found))
        try:
            refuse(", ".join(found), "had undone tmtguard's guards (" + ", ".join(found) +
                   "); tmtguard put them back")
        except TamperViolation:
            pass  # reported; the action being decided is decided on its own


def _active_settings():
    activation = sys.modules.get("tmtguard.activation")
    return getattr(getattr(activation, "active", None), "settings", None)


def _force_set(owner, attr: str, value) -> None:
    if isinstance(owner, type):
        type.__setattr__(owner, attr, value)
    else:
        object.__setattr__(owner, attr, value)


# --- install / seal / uninstall ---------------------------------------------------------------------


_EVENTS = {
    "os.putenv": _on_env,
    "os.unsetenv": _on_env,
    "object.__setattr__": _on_object_setattr,
    "object.__delattr__": _on_object_setattr,
}


def install(policy) -> None:
    global _on
    for event, handler in _EVENTS.items():
        _audit.register(event, handler)
    _on = True


def seal() -> None:
    """After every guard is installed: guard the modules holding patches, snapshot what to keep."""
    if not _on:
        return
    with provenance.internal():
        _seal()


def _seal() -> None:
    from . import modules

    _replacement_ids.clear()
    for guard in modules():
        for entry in getattr(guard, "_patched", None) or ():
            if len(entry) == 4:
                _replacement_ids.add(id(entry[3]))
        for entry in getattr(guard, "_PATCHES", None) or ():
            _replacement_ids.add(id(entry[2]))
    _install_meta_path()
    _guard_state_class()
    names = list(WATCHED) + [n for n in list(sys.modules) if n == "tmtguard" or n.startswith("tmtguard.")]
    for name in names:
        module = sys.modules.get(name)
        if module is None or any(module is m for m in _guarded_modules) or any(module is m for m in _plain_modules):
            continue
        if type(module) is types.ModuleType:
            (_plain_modules if name in UNPINNED else _guarded_modules).append(module)
            if name not in UNPINNED:
                _guarded_ids.add(id(module))
    for module in _guarded_modules:
        if module is sys or module.__name__.startswith("tmtguard"):
            if type(module) is types.ModuleType:
                object.__setattr__(module, "__class__", GuardedModule)
                _module_class[module] = GuardedModule
        else:
            _pin(module)
    del _snapshot[:]
    for module in _guarded_modules + _plain_modules:
        if module is sys or module.__name__.startswith("tmtguard"):
            continue  # sys.meta_path is checked on its own; the app may replace it
        for attr, value in list(vars(module).items()):
            if _tmtguard_object(value) and not isinstance(value, types.ModuleType):
                _snapshot.append((module, attr, value))
    for cls in _watched_classes():
        for attr, value in list(vars(cls).items()):
            if _tmtguard_object(value):
                _snapshot.append((cls, attr, value))
    _handlers.clear()
    _handlers.update(_audit._handlers)
    _handlers_snapshot[0] = _audit.snapshot()
    _expected_cache[:] = [None, ()]
    from . import modules

    _guards[:] = [g for g in modules() if g.__name__ != __name__]
    _patch_lists[:] = [p for p in (getattr(g, "_patched", None) for g in _guards) if isinstance(p, list)]
    _module_pairs[:] = [(m, _module_class.get(m, GuardedModule)) for m in _guarded_modules]
    global _imports
    from . import imports as _imports


def _watched_classes() -> list:
    out = []
    socket = sys.modules.get("socket")
    if socket is not None:
        out.append(socket.socket)
    out.append(threading.Thread)
    return out


def note_thread_started() -> None:
    global _threads_started
    _threads_started = True


def uninstall() -> None:
    global _on
    _on = False
    for event in _EVENTS:
        _audit.unregister(event)
    _guarded_ids.clear()
    while _guarded_modules:
        module = _guarded_modules.pop()
        if isinstance(module, GuardedModule):
            object.__setattr__(module, "__class__", types.ModuleType)
    _module_class.clear()
    _plain_modules.clear()
    if type(sys.meta_path) is MetaPath:
        types.ModuleType.__setattr__(sys, "meta_path", list(sys.meta_path))
    _snapshot.clear()
    _handlers.clear()
    _handlers_snapshot[0] = None
    _expected_cache[:] = [None, ()]
    _patch_lists.clear()
    _module_pairs.clear()
