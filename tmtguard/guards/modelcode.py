"""Where torch's model code comes from: torch hub folders and torch.package archives.

* ``torch.hub.load`` (every source ends in ``torch.hub._load_local(<folder>, ...)``, patched in
  place): a load frame ``torch.hub.load(<folder>)`` (sha256 of its ``hubconf.py``), and the folder is
  model code of that chain: ``hubconf.py`` and every module imported from the folder, whenever it
  runs (a ``forward()`` at inference included).
* ``torch.package.PackageImporter``: ``import_module`` and ``load_pickle`` run in a load frame
  ``torch.package(<archive>)``, and every module body the importer compiles is model code of it.

(Transformers remote code registers itself through ``provenance.register_model_code``; functions
rebuilt from a pickle are adopted by the code guard.) Patched when torch imports them: tmtguard never
imports torch itself.
"""
from __future__ import annotations

import functools
import os
import sys

import wrapt

from .. import provenance

_on = False
_hooked = False
_patched: list = []  # (owner, attribute, original, replacement)


# --- torch.hub ----------------------------------------------------------------------------------


def _hub_load_local(original):
    @functools.wraps(original)
    def _load_local(hubconf_dir, model, *args, **kwargs):
        if not _on:
            return original(hubconf_dir, model, *args, **kwargs)
        folder = os.path.abspath(os.fspath(hubconf_dir))
        hubconf = os.path.join(os.fspath(hubconf_dir), "hubconf.py")
        digest = provenance.file_digest(hubconf)
        frame, token = provenance.push("torch.hub.load", (folder, folder, None, None), container=True,
                                       sha256=digest)
        chain = provenance.peek()
        provenance.register_model_folder(folder, chain)
        provenance.register_model_code(hubconf, chain)
        provenance.register_model_code(os.path.join(folder, "hubconf.py"), chain)
        return provenance.call_in_frame(frame, token, original, hubconf_dir, model, *args, **kwargs)

    _load_local._tmtguard_original = original
    return _load_local


def _patch_hub(module) -> None:
    if not _on:
        return
    current = getattr(module, "_load_local", None)
    if current is None or getattr(current, "_tmtguard_original", None) is not None:
        return
    replacement = _hub_load_local(current)
    module._load_local = replacement
    _patched.append((module, "_load_local", current, replacement))


# --- torch.package --------------------------------------------------------------------------------


def _framed(method: str, original):
    @functools.wraps(original)
    def framed(self, *args, **kwargs):
        if not _on:
            return original(self, *args, **kwargs)
        filename = getattr(self, "filename", None) or "<torch.package>"
        path = os.path.abspath(filename) if not filename.startswith("<") else None
        frame, token = provenance.push("torch.package", (path or filename, path, None, None), container=True)
        return provenance.call_in_frame(frame, token, original, self, *args, **kwargs)

    framed._tmtguard_original = original
    return framed


def _compile_source(original):
    @functools.wraps(original)
    def compile_source(self, fullpath, mangled_filename):
        code = original(self, fullpath, mangled_filename)
        if _on:
            chain = provenance.acting_chain()
            if chain:
                provenance.register_model_code(mangled_filename, chain)
                provenance.register_model_code_object(code, chain)
        return code

    compile_source._tmtguard_original = original
    return compile_source


def _patch_package(module) -> None:
    if not _on:
        return
    importer = getattr(module, "PackageImporter", None)
    if importer is None:
        return
    for attr, make in (("import_module", lambda o: _framed("import_module", o)),
                       ("load_pickle", lambda o: _framed("load_pickle", o)),
                       ("_compile_source", _compile_source)):
        current = importer.__dict__.get(attr)
        if current is None or getattr(current, "_tmtguard_original", None) is not None:
            continue
        replacement = make(current)
        setattr(importer, attr, replacement)
        _patched.append((importer, attr, current, replacement))


_TARGETS = {"torch.hub": _patch_hub, "torch.package.package_importer": _patch_package}


def install(policy) -> None:
    global _on, _hooked
    _on = True
    if not _hooked:
        _hooked = True
        for name, patch in _TARGETS.items():
            wrapt.register_post_import_hook(patch, name)  # runs at once when already imported
    else:
        for name, patch in _TARGETS.items():
            if name in sys.modules:
                patch(sys.modules[name])


def uninstall() -> None:
    global _on
    _on = False
    while _patched:
        owner, attr, original, replacement = _patched.pop()
        if getattr(owner, attr, None) is replacement:
            setattr(owner, attr, original)


def patches() -> list:
    return [(owner, attr, replacement) for owner, attr, _orig, replacement in _patched]
