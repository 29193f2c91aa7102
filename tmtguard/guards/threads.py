"""Threads started by guarded loads and model code carry their chain.

A new thread starts with an empty context: without this, ``threading.Thread(target=os.system,
args=(...)).start()`` (or a ``Timer`` calling ``tmtguard.deactivate``) in model code would act as
application code, no model code being on the new thread's stack. ``threading.Thread.start`` is
patched: a thread started while a chain is acting runs with that chain as its own (for the whole
life of the thread: a pool worker first started by model code stays attributed to it).

``_thread.start_new_thread`` called directly is not covered (see the README's limits).
"""
from __future__ import annotations

import threading

from .. import provenance
from . import _scope

_on = False
_original_start = threading.Thread.start

_chain = _scope._chain
_lazy = _scope._lazy
_model_code = _scope._model_code


def start(self):
    if _on and (_chain() or _model_code) and not _lazy.internal:
        chain = provenance.acting_chain()
        if chain:
            from . import tamper

            tamper.note_thread_started()
            self._tmtguard_chain = chain
            run = self.run

            def run_with_chain():
                provenance._CHAIN.set(chain)
                return run()

            self.run = run_with_chain
    return _original_start(self)


start._tmtguard_original = _original_start
start.__doc__ = _original_start.__doc__
_patched: list = []


def thread_chain():
    """The chain the current thread was started with (by a guarded load or model code), or None."""
    return getattr(threading.current_thread(), "_tmtguard_chain", None)


def install(policy) -> None:
    global _on
    _on = True
    if threading.Thread.start is not start:
        _patched.append((threading.Thread, "start", threading.Thread.start, start))
        threading.Thread.start = start


def uninstall() -> None:
    global _on
    _on = False
    while _patched:
        owner, attr, original, replacement = _patched.pop()
        if owner.__dict__.get(attr) is replacement:
            setattr(owner, attr, original)
