"""The one PEP 578 audit hook. CPython calls it for every audit event in the process, so its fast
path is a single dict lookup; guards register a handler per event name.

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
    handler = _get(event)
    if handler is not None:
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


def register(event: str, handler) -> None:
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
    _handlers[event] = handler


def unregister(event: str) -> None:
    _handlers.pop(event, None)
