"""multiprocessing's resource sharer: the file-descriptor hand-over between this process and its own
children (a DataLoader worker sending a tensor with the ``file_descriptor`` sharing strategy).

The pickle such a child sends names ``torch.multiprocessing.reductions:rebuild_storage_fd`` and a
``multiprocessing.resource_sharer:DupFd``, both in the built-in allowlist; rebuilding it connects
to the sender's listener, an authenticated unix socket that multiprocessing created in its own
temporary folder (``<tmp>/pymp-*/listener-*``). That connect is plumbing, not the artifact's doing:
it runs as tmtguard's own work. Any other address in a ``DupFd`` (a TCP host:port, another unix
socket) can only come from a crafted pickle, and stays a ``network.connect`` the network guard
decides: ``rebuild_storage_fd`` with a forged ``DupFd`` is otherwise a connect to anywhere made
with nothing but allowlisted globals.

Patched when multiprocessing.resource_sharer is imported.
"""
from __future__ import annotations

import os

import wrapt

from .. import provenance

_on = False
_registered = False
_patched: list = []  # (class, original staticmethod)


def _own_listener(address) -> bool:
    """A listener multiprocessing made for itself: ``<tmp>/pymp-*/listener-*`` or an abstract
    ``\\0listener-*`` name (newer Pythons)."""
    if isinstance(address, bytes):
        address = os.fsdecode(address)
    if not isinstance(address, str):
        return False
    if address.startswith("\0listener-"):
        return True
    folder, name = os.path.split(address)
    return name.startswith("listener-") and os.path.basename(folder).startswith("pymp-") and "/" not in name


def _patch(module) -> None:
    cls = getattr(module, "_ResourceSharer", None)
    if cls is None or _patched:
        return
    original = cls.__dict__["get_connection"]
    get = original.__func__

    def get_connection(ident):
        if _on and _own_listener(ident[0] if isinstance(ident, tuple) and ident else None):
            with provenance.internal():
                return get(ident)
        return get(ident)

    get_connection._tmtguard_original = get
    cls.get_connection = staticmethod(get_connection)
    _patched.append((cls, original))


def _on_import(module) -> None:
    if _on:
        _patch(module)


def install(policy) -> None:
    global _on, _registered
    _on = True
    if not _registered:
        wrapt.register_post_import_hook(_on_import, "multiprocessing.resource_sharer")
        _registered = True
    else:
        import sys

        module = sys.modules.get("multiprocessing.resource_sharer")
        if module is not None:
            _patch(module)


def uninstall() -> None:
    global _on
    _on = False
    while _patched:
        cls, original = _patched.pop()
        cls.get_connection = original
