"""tmtguard: runtime defence against transitive model threats.

``import tmtguard`` activates the guard (in ``enforce`` unless ``TMTGUARD_MODE`` says otherwise;
``TMTGUARD_MODE=off`` turns even this off). See the README for the allowlist format, the events and
every ``TMTGUARD_*`` variable.
"""
from __future__ import annotations

import sys

__version__ = "0.1.0"

from .activation import activate, deactivate, status
from .config import ConfigError
from .decision import (CodeViolation, FileViolation, GuardError, ImportViolation, NativeViolation, NetworkViolation,
                       PickleViolation, ProcessViolation, RemoteCodeViolation, TamperViolation, Violation)
from .events import add_sink, remove_sink
from .policy import AllowlistError, Policy
from .provenance import LoadFrame

__all__ = [
    "activate", "deactivate", "status", "guarded_load", "add_sink", "remove_sink",
    "Violation", "PickleViolation", "NetworkViolation", "ImportViolation", "ProcessViolation", "CodeViolation", "NativeViolation", "FileViolation",
    "TamperViolation", "RemoteCodeViolation", "GuardError", "ConfigError", "AllowlistError", "Policy", "LoadFrame",
]


class guarded_load:
    """Mark a load of your own (a custom loader) so that what happens inside carries its frame:
    ``with tmtguard.guarded_load("myloader", path): ...``"""

    def __init__(self, loader: str, artifact, *, repo: str | None = None, revision: str | None = None):
        self._args = (loader, artifact, repo, revision)
        self._held = None

    def __enter__(self):
        from . import provenance

        loader, artifact, repo, revision = self._args
        self._held = provenance.push(loader, artifact, container=True, repo=repo, revision=revision,
                                     entry=sys._getframe(1))
        return self._held[0]

    def __exit__(self, exc_type, exc, tb):
        from . import provenance

        frame, token = self._held
        provenance.pop(frame, token, exc)
        return False


def _activate_on_import() -> None:
    from . import _startup

    _startup.activate_or_exit(explicit_import=True)


_activate_on_import()
