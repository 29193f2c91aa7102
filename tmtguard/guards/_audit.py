"""The one PEP 578 audit hook. CPython calls it for every audit event in the process, so its fast
path must cost next to nothing; guards register a handler per event name (and, for the pickle guard,
a set of arguments the hook lets through itself).

Two implementations of the same table:

* ``tmtguard._auditfast`` (C, built with the wheel where a compiler is present): a runtime hook added
  with ``PySys_AddAuditHook``. An event nobody registered costs a string compare; an event whose
  arguments are in the allow-set (a built-in pickle global) is settled in C. A Python hook costs
  CPython ~2,500 instructions per event before its first line runs, which made up a third of a
  guarded small ``pickle.loads``.
* a Python hook (``sys.addaudithook``), when the extension is absent: same decisions, slower.

Either way the hook cannot be removed once added, which is the point: it backs the patches for
references bound before tmtguard started (``from _pickle import loads``) and for anything that
restores an original. When tmtguard is off the table is empty and the hook returns at once.
"""
from __future__ import annotations

import os
import sys

from .. import decision
from ..decision import Violation

try:
    from .. import _auditfast as _fast
except ImportError:  # no compiler when the wheel was built: the Python hook below
    _fast = None

#: the C hook is in use (``tmtguard check`` and the benchmarks report it)
native = _fast is not None

_handlers: dict = {}  # event -> (allowed, handler): what tmtguard registered (tamper re-checks against it)
_scopes: dict = {}  # event -> scope
_callers: dict = {}  # event -> frozenset of trusted calling modules (the C hook's pre-filter), or None
_installed = False
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # tmtguard's own code

# When a handler can act at all: its own first test, which the C hook makes before entering Python.
ALWAYS = 0  # every event (the pickle guard: every unpickling is checked)
MODEL = 1  # only while a guarded load is on the chain or model code exists (files)
WIDE = 2  # ... or when TMTGUARD_PROCESS_WIDE is on (imports, processes, code, native)
NET_WIDE = 3  # ... or when network.process_wide is on (network)
_wide = {WIDE: False, NET_WIDE: False}


def _dispatch(event, args, handler):
    """The slow path, for both hooks: run the guard's handler; a bug in it fails closed in enforce and
    never breaks the application in audit."""
    try:
        handler(args)
    except Violation:
        raise
    except Exception as exc:
        _failed(event, args, exc)


def _hook(event, args, _get=_handlers.get):
    # _dispatch inlined: the guards find the frame that raised the event at a fixed depth (handler,
    # then the hook's one Python frame: this one, or _dispatch under the C hook)
    entry = _get(event)
    if entry is not None:
        allowed, handler = entry
        # an event whose args are in the guard's allow-set (a built-in pickle global) costs no second call
        if allowed is not None and args in allowed:
            return
        try:
            handler(args)
        except Violation:
            raise
        except Exception as exc:
            _failed(event, args, exc)


def _failed(event, args, exc) -> None:
    try:
        target = repr(args)[:200]
    except Exception:
        target = "<args>"
    decision.failed(event, target, exc)


def _gate(what: str) -> None:
    """Asked by the C table before every change: code inside a guarded load or model code may not
    unregister a handler or narrow the scopes (a TamperViolation in enforce, recorded in audit)."""
    tamper = sys.modules.get("tmtguard.guards.tamper")
    if tamper is not None and tamper._on and tamper.acting() is not None:
        tamper.refuse(f"tmtguard._auditfast.{what}", "tried to change tmtguard's audit hook table")


def _install() -> None:
    global _installed
    if _fast is not None:
        from .. import provenance

        _fast.install(_dispatch, _gate)
        _fast.set_scope(provenance._CHAIN, provenance._model_code)
    else:
        sys.addaudithook(_hook)
    _installed = True


def register(event: str, handler, allowed: frozenset | None = None, scope: int = ALWAYS,
             callers: frozenset | None = None) -> None:
    """Call ``handler(args)`` for ``event``; when ``allowed`` is given (hashable args only), args in it
    are let through by the hook itself, and with a ``scope`` the C hook skips events the handler's
    own first test would return from (the Python hook calls the handler, which makes that test).
    ``callers``: module names whose own calls (the frame that raised the event, when it is no model
    code and not tmtguard's) the handler lets through; the C hook then skips them too."""
    if not _installed:
        _install()
    entry = (allowed, handler)
    if _fast is not None:
        _fast.register(event, handler, allowed, scope, callers, _OWN_DIR if callers is not None else None)
    else:
        _gate("register")
    _handlers[event] = entry
    _scopes[event] = scope
    _callers[event] = callers


def unregister(event: str) -> None:
    if _fast is not None:
        _fast.unregister(event)  # asks the gate itself
    else:
        _gate("unregister")
    _handlers.pop(event, None)
    _scopes.pop(event, None)
    _callers.pop(event, None)


def set_wide(kind: int, on: bool) -> None:
    """A process-wide setting the scoped handlers depend on (WIDE or NET_WIDE)."""
    _wide[kind] = bool(on)
    if _fast is not None:
        _fast.set_wide(kind, bool(on))


_reads: list = [None]  # (env, sources, memo) given to fast_reads, or None


def fast_reads(env, sources=None, memo=None) -> None:
    """The file guard's read fast path in the C hook (see ``read_allowed`` in _auditfast.c): ``open``
    events its settings memo lets through at once are settled without entering Python. ``env`` None
    turns it off. Nothing to do with the Python hook, which always calls the handler."""
    _reads[0] = None if env is None else (env, tuple(sources), memo)
    if _fast is not None:
        _fast.set_reads(*(_reads[0] or (None,)))


def reapply() -> None:
    """Put the C hook's scope inputs back (the tamper guard's repair)."""
    if _fast is not None:
        from .. import provenance

        _fast.set_scope(provenance._CHAIN, provenance._model_code)
        for kind, on in _wide.items():
            _fast.set_wide(kind, on)
        if _reads[0] is not None and "open" in _handlers:
            _fast.set_reads(*_reads[0])


def current(event: str):
    """(allowed, handler) the hook uses for ``event`` right now, or None."""
    if _fast is not None:
        return _fast.lookup(event)
    return _handlers.get(event)


def snapshot():
    """Something :func:`intact` compares against to tell, cheaply, that no handler changed since."""
    if _fast is not None:
        return _fast.generation()
    return dict(_handlers)


def intact(snap) -> bool:
    if _fast is not None:
        return _fast.generation() == snap
    if len(_handlers) != len(snap):
        return False
    get = _handlers.get
    for event, entry in snap.items():
        if get(event) is not entry:
            return False
    return True


def restore(event: str, entry) -> bool:
    """Put ``entry`` back for ``event`` if the hook's table says otherwise; True if it had to."""
    now = current(event)
    if now is not None and now[0] is entry[0] and now[1] is entry[1]:
        return False
    _handlers[event] = entry
    if _fast is not None:
        callers = _callers.get(event)
        _fast.register(event, entry[1], entry[0], _scopes.get(event, ALWAYS), callers,
                       _OWN_DIR if callers is not None else None)
    return True
