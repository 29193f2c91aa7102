"""Who the import, process, code, native and file guards check, and how they word a refusal.

In scope: a guarded load (the chain is not empty), model code on the stack
(:func:`provenance.acting_chain`), and, for the rules ``TMTGUARD_PROCESS_WIDE=1`` extends (import,
process, code, native), every caller. Never tmtguard's own work.

Each hook starts with the same inline test, before calling anything::

    if not _chain() and not _model_code and not wide.on:
        return

so that application code pays a ContextVar read and two truth tests.
"""
from __future__ import annotations

import os
import sys

from .. import decision, provenance
from ..policy import suggestion

_chain = provenance._CHAIN.get
_lazy = provenance._lazy
_model_code = provenance._model_code  # never rebound by provenance

_OWN_DIR = provenance._OWN_DIR
_frame_at = provenance.frame_at
_code_of = provenance.code_of
_IMPORT_MACHINERY = ("<frozen importlib", "<frozen zipimport")


class _Wide:
    """TMTGUARD_PROCESS_WIDE, read from decision.state at install."""

    on = False


wide = _Wide()


def configure() -> None:
    wide.on = bool(getattr(decision.state, "process_wide", False))
    from . import _audit

    _audit.set_wide(_audit.WIDE, wide.on)


def checked_chain(applies_wide: bool = True, verify: bool = True):
    """The chain an action is checked against: () for application code under the process-wide
    rules, None when it is not checked. Call after the inline fast-path test. With ``verify=False``
    the caller runs :func:`tamper_check` itself, after its own cheap early returns and before it
    decides."""
    if _lazy.internal:
        return None
    chain = provenance.acting_chain()
    if chain is None:
        return () if applies_wide and wide.on else None
    if verify:
        tamper_check()
    return chain


def tamper_check() -> None:
    """Undo tampering that got past the checks before a decision (tamper.verify)."""
    from . import tamper

    tamper.verify()


def frame(depth: int):
    """sys._getframe(depth) of the caller, or None when the stack is not that deep (the interpreter
    itself compiling the main program or a traceback line, with no Python frame at all)."""
    return _frame_at(depth + 1)


def caller(depth: int):
    """The frame that performed the intercepted call, ``depth`` frames above the caller of this
    function, stepping over tmtguard's own frames (the audit hook, a patch's wrapper)."""
    f = frame(depth + 1)
    while f is not None and _code_of(f).co_filename.startswith(_OWN_DIR):
        f = f.f_back
    return f


def in_import_machinery(frame) -> bool:
    return frame is not None and _code_of(frame).co_filename.startswith(_IMPORT_MACHINERY)


def is_model_code(frame) -> bool:
    """The frame runs model code: its module's file, or its code, is registered (see provenance)."""
    try:
        if frame.f_globals.get("__file__") in _model_code:
            return True
    except TypeError:
        pass
    code = _code_of(frame)
    return code.co_filename in _model_code or id(code) in _model_code


def installed(filename: str) -> bool:
    """True for a file of an installed distribution (site-packages), not the stdlib nor model code."""
    if not filename or filename.startswith("<") or provenance._stdlib_file(filename):
        return False
    return provenance._installation_path(os.path.dirname(filename)) and filename not in _model_code


def who(chain) -> str:
    if not chain:
        return "application code (TMTGUARD_PROCESS_WIDE=1)"
    if provenance.peek():
        return "a guarded load"
    return "model code"


def refuse(action: str, target: str, rule: str, chain, *, section: str | None, entry: str | None,
           violation, detail: dict | None = None, warning: str | None = None, origin=None):
    """decision.refuse with the allowlist lines (global and scoped to the innermost artifact) that
    would permit ``entry`` in ``section``."""
    frame = chain[-1] if chain else None
    hint = None
    if section and entry:
        hint = suggestion(section, entry, frame, digest=frame.event_digest() if frame is not None else None)
    return decision.refuse(action, target, f"{who(chain)} {rule}", chain=chain, suggestion=hint,
                           violation=violation, detail=detail, warning=warning,
                           origin=origin if origin is not None else provenance.origin(2))


def text(value, limit: int = 200) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "backslashreplace")
    value = str(value)
    return value if len(value) <= limit else value[:limit] + "…"
