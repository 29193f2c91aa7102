"""multiprocessing's spawn and forkserver children: the bootstrap a child reads from its parent.

A child started with the ``spawn`` or ``forkserver`` method (DataLoader workers with
``multiprocessing_context="spawn"``, ``multiprocessing`` on macOS, CUDA users) starts a fresh
interpreter, which the guard enters through the environment, and then unpickles two objects its
parent wrote into a pipe: the preparation data and the ``Process`` object (target, arguments,
dataset...). That is the application handing itself its own state, not an artifact: those two loads
are tmtguard's own business, and everything the child does afterwards is guarded as usual.

The two loads are told apart by ``multiprocessing``'s own flag: ``spawn._main`` sets
``current_process()._inheriting`` around them and nowhere else.
"""
from __future__ import annotations

import pickle
import sys

import wrapt

from .. import provenance

_on = False
_registered = False
_real_reduction = None  # multiprocessing.spawn.reduction before install


class _ParentPickle:
    """``pickle`` as ``spawn._main`` sees it: ``load`` trusts the parent's bootstrap data."""

    def __getattr__(self, name):
        return getattr(pickle, name)

    @staticmethod
    def load(file, *args, **kwargs):
        from multiprocessing import process

        if _on and getattr(process.current_process(), "_inheriting", False):
            with provenance.internal():
                return pickle.load(file, *args, **kwargs)
        return pickle.load(file, *args, **kwargs)


class _Reduction:
    """``multiprocessing.reduction`` as ``spawn`` sees it, with :class:`_ParentPickle` as its pickle."""

    pickle = _ParentPickle()

    def __init__(self, real):
        self._tmtguard_real = real

    def __getattr__(self, name):
        return getattr(self._tmtguard_real, name)


def _patch(module) -> None:
    global _real_reduction
    current = getattr(module, "reduction", None)
    if _on and current is not None and not isinstance(current, _Reduction):
        _real_reduction = current
        module.reduction = _Reduction(current)


def install(policy) -> None:
    global _on, _registered
    _on = True
    if not _registered:
        wrapt.register_post_import_hook(_patch, "multiprocessing.spawn")
        _registered = True
    elif "multiprocessing.spawn" in sys.modules:
        _patch(sys.modules["multiprocessing.spawn"])


def uninstall() -> None:
    global _on
    _on = False
    module = sys.modules.get("multiprocessing.spawn")
    if module is not None and isinstance(getattr(module, "reduction", None), _Reduction):
        module.reduction = module.reduction._tmtguard_real
