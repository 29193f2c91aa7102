"""The native guard: native libraries, symbol lookups and sub-interpreters (``native.load``).

Native code is invisible to an in-process guard once it runs, so the decision is at the door:

* ``ctypes.dlopen`` (``ctypes.CDLL``/``PyDLL``/``cdll.LoadLibrary``; ``None`` is the program itself,
  shown as ``<process>``) and ``ctypes.dlsym`` (``lib.system``, ``lib["system"]``) PEP 578 events;
* ``cffi``'s ``FFI.dlopen`` (patched when cffi is imported; cffi raises no event);
* ``cpython.PyInterpreterState_New``: a sub-interpreter, whose actions the main interpreter's audit
  hook never sees (``<subinterpreter>``);
* a native extension module imported from a model-code folder (the import guard hands it here).

``native.allow`` entries: ``LIB`` (load it and look up any symbol in it), ``LIB:SYMBOL`` (load it,
look up that symbol only), where LIB is a path, a file name or a glob; ``<process>`` and
``<subinterpreter>``. An installed distribution loading a library from the interpreter's
installation (torch loading its own ``.so`` files) is that distribution's business.
"""
from __future__ import annotations

import os
import threading

from .. import decision, provenance
from ..decision import NativeViolation
from . import _audit, _scope

_on = False
_policy = None
_cffi_hooked = False
_patched: list = []

_chain = _scope._chain
_lazy = _scope._lazy
_model_code = _scope._model_code
_wide = _scope.wide
_lock = threading.Lock()


def _quiet() -> bool:
    return not _chain() and not _model_code and not _wide.on


def _library_name(name) -> str:
    if name is None:
        return "<process>"
    if isinstance(name, int):
        return f"<handle:{name:#x}>"
    return _scope.text(name, 4096)


def _on_dlopen(args):
    if _quiet():
        return
    check_library(_library_name(args[0]), via="ctypes.dlopen")


def _on_dlsym(args):
    if _quiet():
        return
    lib = args[0]
    library = _library_name(getattr(lib, "_name", None)) if not isinstance(lib, int) else _library_name(lib)
    check_symbol(library, _scope.text(args[1]), via="ctypes.dlsym")


def _on_dlsym_handle(args):
    if _quiet():
        return
    check_symbol(_library_name(args[0]), _scope.text(args[1]), via="ctypes.dlsym")


def _on_subinterpreter(args):
    if _quiet():
        return
    check_library("<subinterpreter>", via="sub-interpreter")


def check_library(library: str, chain=None, *, via: str) -> None:
    _decide(library, None, chain, via)


def check_symbol(library: str, symbol: str, chain=None, *, via: str) -> None:
    _decide(library, symbol, chain, via)


def _decide(library: str, symbol, chain, via: str) -> None:
    if not _on or _lazy.internal:
        return
    if chain is None:
        chain = _scope.checked_chain()
        if chain is None:
            return
    try:
        if _policy.native_allowed(library, symbol, chain) is not None:
            return
        if _own_library(library):
            return
        target = library if symbol is None else f"{library}:{symbol}"
        if library == "<subinterpreter>":
            what = "created a sub-interpreter (whose actions this interpreter's audit hook never sees)"
        else:
            what = f"looked up {symbol!r} in {library!r}" if symbol else f"loaded {library!r}"
        _scope.refuse(
            "native.load", target,
            f"{what} ({via}), and no native.allow rule names it; native code runs unseen by any in-process guard",
            chain, section="native", entry=target, violation=NativeViolation,
            detail={"via": via, "library": library, **({"symbol": symbol} if symbol else {})},
            warning="native code can do anything the process can" if symbol is None or library == "<process>" else None,
        )
    except decision.Violation:
        raise
    except Exception as exc:
        decision.failed("native.load", library, exc, violation=NativeViolation)


def _own_library(library: str) -> bool:
    """An installed distribution (not model code) loading a library from the interpreter's installation."""
    if not os.path.isabs(library):
        return False
    if not provenance._installation_path(os.path.dirname(os.path.realpath(library))):
        return False
    f = _scope.caller(2)
    while f is not None and provenance._stdlib_file(f.f_code.co_filename):
        f = f.f_back
    return f is not None and not _scope.is_model_code(f) and _scope.installed(f.f_code.co_filename)


# --- cffi ---------------------------------------------------------------------------------------


def _patch_cffi(module) -> None:
    ffi_class = getattr(module, "FFI", None)
    if ffi_class is None or not _on:
        return
    original = ffi_class.dlopen
    if getattr(original, "_tmtguard_original", None) is not None:
        return

    def dlopen(self, name, flags=0):
        if not _quiet() and _on:
            check_library(_library_name(name), via="cffi.FFI.dlopen")
        return original(self, name, flags)

    dlopen._tmtguard_original = original
    dlopen.__doc__ = original.__doc__
    ffi_class.dlopen = dlopen
    _patched.append((ffi_class, "dlopen", original, dlopen))


_EVENTS = {
    "ctypes.dlopen": _on_dlopen,
    "ctypes.dlsym": _on_dlsym,
    "ctypes.dlsym/handle": _on_dlsym_handle,
    "cpython.PyInterpreterState_New": _on_subinterpreter,
}


def install(policy) -> None:
    global _on, _policy, _cffi_hooked
    _policy = policy
    _scope.configure()
    for event, handler in _EVENTS.items():
        _audit.register(event, handler, scope=_audit.WIDE)
    _on = True
    import sys

    if "cffi.api" in sys.modules:
        _patch_cffi(sys.modules["cffi.api"])
    elif not _cffi_hooked:
        import wrapt

        wrapt.register_post_import_hook(_patch_cffi, "cffi.api")
        _cffi_hooked = True


def uninstall() -> None:
    global _on
    _on = False
    for event in _EVENTS:
        _audit.unregister(event)
    while _patched:
        owner, attr, original, replacement = _patched.pop()
        if getattr(owner, attr, None) is replacement:
            setattr(owner, attr, original)


def patches() -> list:
    return [(owner, attr, replacement) for owner, attr, _orig, replacement in _patched]
