"""The code guard: new code made at run time by guarded loads and model code (``code.exec``).

PEP 578 events, decided before the code exists:

* ``compile``: ``compile``/``exec``/``eval`` of a source string (``exec`` and ``eval`` compile first);
* ``marshal.loads`` / ``marshal.load``: a code object from bytes;
* ``code.__new__``: ``types.CodeType(...)`` and ``code.replace(...)``.

Who generates the code is the module of the frame that made the call, or ``pickle`` when the
unpickler itself called ``marshal.loads``/``types.CodeType`` (a pickle's REDUCE). ``code.allow`` names
the modules allowed to generate code; the built-in list (``allowlists/imports.yaml``) names the
framework code generators that must keep working: ``torch.fx`` (GraphModule.recompile), dynamo,
inductor, ``dataclasses``, ``collections.namedtuple``, ``typing`` forward references, ``ast.parse``.
What generated code then does is still checked: the model code that asked is still on the stack.

Not code generation: the import machinery compiling or unmarshalling a module it imports (the import
guard decides imports), and running an existing code object.

Code that came from an artifact becomes model code (attributed to its load's chain wherever it runs,
long after loading): a function built from a code object (``function.__new__``) and code objects
executed (``exec`` event) while a guarded load or model code is acting, with the functions nested in
them. The ``exec`` event of a module body run by the import machinery goes to the import guard.
"""
from __future__ import annotations

import os

from .. import decision, provenance
from ..decision import CodeViolation
from . import _audit, _scope
from . import transformers as _remote

_on = False
_policy = None

_chain = _scope._chain
_lazy = _scope._lazy
_model_code = _scope._model_code
_wide = _scope.wide

_getframe = provenance.frame_at  # None, not ValueError, when the stack is not that deep
_code_of = provenance.code_of  # frame.f_code without an audit event
_OWN_DIR = _scope._OWN_DIR
_PICKLE_GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pickle.py")


def _on_compile(args):
    if not _chain() and not _model_code and not _wide.on:
        return
    # a copy of remote code about to run: its bytes are checked as they compile; the import machinery
    # compiling the bytes decided is the import, which the import guard decides (nothing to check here)
    if _remote._expected and _remote.compiling(args[1], args[0]) and _scope.in_import_machinery(_getframe(2)):
        return
    try:  # a code generator every chain may use (typing, dataclasses) calling compile() itself
        f = _getframe(2)  # 0 here, 1 the audit hook's frame, 2 the caller of compile()
        if f.f_globals.get("__name__") in _policy.code_exact and not _code_of(f).co_filename.startswith(_OWN_DIR):
            return
    except (ValueError, AttributeError, TypeError):
        pass
    _check("compile", args[1], args[0])


def _on_marshal(args):
    if not _chain() and not _model_code and not _wide.on:
        return
    _check("marshal.loads", None, None)


def _on_code_new(args):
    if not _chain() and not _model_code and not _wide.on:
        return
    _check("types.CodeType", args[1], None, name=args[2])


def _on_function_new(args):
    if not _chain() and not _model_code:
        return
    f = _scope.frame(2)
    # a framework's module body defining functions at import (its start-up) makes no model code
    if f is not None and not _executing_module(f):
        _adopt(args[0])


def _on_exec(args):
    if not _chain() and not _model_code and not _wide.on:
        return
    code = args[0]
    f = _scope.frame(2)
    if f is None:
        return
    if _scope.in_import_machinery(f):
        if code.co_name == "<module>":
            from . import imports

            if _remote._expected:
                _remote.module_runs(code)

            imports.module_exec(code, f)
        return
    # code the unpickler itself runs (a REDUCE of exec), or that model code runs. Not what a framework
    # executes inside a load (torch.fx's generated forward): that is the framework's code, and
    # registering it would make every later stack walk look at code objects.
    if _code_of(f).co_filename == _PICKLE_GUARD or f.f_globals.get("__name__") == "pickle" or _scope.is_model_code(f):
        _adopt(code)


def _adopt(code) -> None:
    """Code made or run by a guarded load or model code is model code of that chain."""
    if not _on or _lazy.internal or not hasattr(code, "co_consts"):
        return
    if id(code) in _model_code:
        return
    chain = provenance.acting_chain()
    if chain:
        provenance.register_model_code_object(code, chain)


def _check(via: str, filename, source, name=None) -> None:
    if not _on or _lazy.internal:
        return
    # sys._getframe: 0 _check, 1 the event handler, 2 the audit hook, 3 the caller of compile()...
    f = _scope.frame(3)
    if f is None:
        return  # no Python frame: the interpreter compiling the main program or a traceback line
    try:
        generator = _generator(f)
        if _policy.code_allowed(generator, ()) is not None:
            return  # a generator every chain may use (typing, dataclasses): no stack walk
    except Exception as exc:
        decision.failed("code.exec", via, exc, violation=CodeViolation)
        return
    chain = _scope.checked_chain(verify=False)
    if chain is None or _executing_module(f):
        return
    _scope.tamper_check()
    try:
        if chain and _policy.code_allowed(generator, chain) is not None:
            return  # a code.allow rule scoped to the innermost artifact
        detail = {"via": via}
        if filename is not None:
            detail["filename"] = _scope.text(filename)
        if name is not None:
            detail["name"] = _scope.text(name)
        if isinstance(source, (str, bytes, bytearray)):
            detail["source"] = _scope.text(source)
        what = {"compile": "compiled a source string", "marshal.loads": "built a code object with marshal",
                "types.CodeType": "built a code object with types.CodeType"}[via]
        snippet = f" ({detail['source']!r})" if "source" in detail else ""
        _scope.refuse(
            "code.exec", generator,
            f"{what}{snippet} in {generator!r}, and no code.allow rule names {generator!r}",
            chain, section="code", entry=generator, violation=CodeViolation, detail=detail,
            warning="code.allow lets that module run code of its choosing" if generator == "pickle" else None,
        )
    except decision.Violation:
        raise
    except Exception as exc:
        decision.failed("code.exec", via, exc, violation=CodeViolation)


def _executing_module(f) -> bool:
    """The import machinery compiling or unmarshalling the body of a module it is executing (the
    import guard decided that module), or code generated while an installed library's module body
    runs under that machinery, below any model code (mpmath, which transformers' import pulls in,
    generates code at import): the import was the decision, the library's start-up is its own.
    Model code calling importlib's helpers itself is not this."""
    while f is not None and _scope.in_import_machinery(f):
        if _code_of(f).co_name == "exec_module":
            return True
        f = f.f_back
    # stop at model code, and at tmtguard's own load wrappers (an import above the load is not this)
    while f is not None and not _scope.is_model_code(f) and not _code_of(f).co_filename.startswith(_scope._OWN_DIR):
        if _code_of(f).co_name == "exec_module" and _scope.in_import_machinery(f):
            return True
        f = f.f_back
    return False


def _generator(f) -> str:
    """The module that asked for new code: ``pickle`` when the unpickler did (a REDUCE calling
    ``marshal.loads`` comes straight from C, under tmtguard's pickle entry points)."""
    while f is not None and _code_of(f).co_filename.startswith(_scope._OWN_DIR):
        if _code_of(f).co_filename == _PICKLE_GUARD:
            return "pickle"
        f = f.f_back
    if f is None:
        return "?"
    return f.f_globals.get("__name__") or "?"


_EVENTS = {
    "compile": _on_compile,
    "marshal.loads": _on_marshal,
    "marshal.load": _on_marshal,
    "code.__new__": _on_code_new,
    "function.__new__": _on_function_new,
    "exec": _on_exec,
}


def install(policy) -> None:
    global _on, _policy
    _policy = policy
    _scope.configure()
    for event, handler in _EVENTS.items():
        # compile() and exec() called by a code generator every chain may use (typing evaluating
        # annotations, dataclasses): _on_compile and _on_exec return at once, so the C hook does not
        # call them (a remote-code load raises ~24 such events, each a Python call otherwise)
        # (not "pickle" for exec, even when code.allow names it: what the unpickler executes is adopted)
        callers = policy.code_exact if event == "compile" else policy.code_exact - {"pickle"} if event == "exec" else None
        _audit.register(event, handler, scope=_audit.MODEL if event == "function.__new__" else _audit.WIDE,
                        callers=callers)
    _on = True


def uninstall() -> None:
    global _on
    _on = False
    for event in _EVENTS:
        _audit.unregister(event)
