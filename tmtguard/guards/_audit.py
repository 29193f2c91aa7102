"""The one PEP 578 audit hook. CPython calls it for every audit event in the process, so its fast
path is a single dict lookup; guards register a handler per event name (and, for the pickle guard,
a set of arguments the hook lets through itself).

A hook cannot be removed once added, which is the point: it backs the patches for references bound
before tmtguard started (``from _pickle import loads``) and for anything that restores an original.
When tmtguard is off the table is empty and the hook returns at once.
"""
from __future__ import annotations

import sys

from .. import decision
from ..decision import Violation

_handlers: dict = {}
_installed = False


def _hook(event, args, _get=_handlers.get):
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
        except Exception as exc:  # a bug in a guard: fail closed in enforce, never break the app in audit
            _failed(event, args, exc)


def _failed(event, args, exc) -> None:
    try:
        target = repr(args)[:200]
    except Exception:
        target = "<args>"
    decision.failed(event, target, exc)


def register(event: str, handler, allowed: frozenset | None = None) -> None:
    """Call ``handler(args)`` for ``event``; when ``allowed`` is given (hashable args only), args in it
    are let through by the hook itself."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
    _handlers[event] = (allowed, handler)


def unregister(event: str) -> None:
    _handlers.pop(event, None)
