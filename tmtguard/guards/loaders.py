"""Container loaders: ``torch.load``, ``numpy.load``, ``joblib.load``. Each call pushes a load frame
(so a checkpoint that loads another one shows both in the chain), and the unpickler it runs adopts
that frame. Patched when the library is imported (wrapt post-import hooks): tmtguard never imports
torch, numpy or joblib itself.
"""
from __future__ import annotations

import functools

import wrapt

from .. import provenance

_on = False
_registered = False
_patched: list = []  # (owner, attribute, original)

# module -> [(owner path inside the module, attribute, loader name, name of the artifact argument)]
TARGETS = {
    "torch": [("torch", "load", "torch.load", "f"), ("torch.serialization", "load", "torch.load", "f")],
    "numpy": [("numpy", "load", "numpy.load", "file")],
    "joblib": [("joblib", "load", "joblib.load", "filename"),
               ("joblib.numpy_pickle", "load", "joblib.load", "filename")],
}


def _guarded(loader: str, argname: str, fn):
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        if not _on:
            return fn(*args, **kwargs)
        artifact = args[0] if args else kwargs.get(argname)
        frame, token = provenance.push(loader, artifact, container=True)
        return provenance.call_in_frame(frame, token, fn, *args, **kwargs)

    guarded._tmtguard_original = fn
    return guarded


def _patch_module(module) -> None:
    import importlib
    import sys

    for owner_name, attr, loader, argname in TARGETS.get(module.__name__, ()):
        owner = sys.modules.get(owner_name) or importlib.import_module(owner_name)
        current = getattr(owner, attr, None)
        if current is None or getattr(current, "_tmtguard_original", None) is not None:
            continue
        # torch.load and torch.serialization.load are one function: wrap it once, set it twice.
        wrapper = next((w for o, a, orig, w in _patched if orig is current), None) or _guarded(loader, argname, current)
        setattr(owner, attr, wrapper)
        _patched.append((owner, attr, current, wrapper))


def _on_import(module) -> None:
    if _on:
        _patch_module(module)


def install(policy) -> None:
    global _on, _registered
    _on = True
    if not _registered:
        for name in TARGETS:
            wrapt.register_post_import_hook(_on_import, name)
        _registered = True
    else:
        import sys

        for name in TARGETS:
            if name in sys.modules:
                _patch_module(sys.modules[name])


def uninstall() -> None:
    global _on
    _on = False
    while _patched:
        owner, attr, original, wrapper = _patched.pop()
        if getattr(owner, attr, None) is wrapper:
            setattr(owner, attr, original)
