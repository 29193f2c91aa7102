"""Interceptors: one module per interception point, each with ``install(policy)`` (idempotent; a
second call refreshes the policy it reads) and ``uninstall()``. Adding an integration means adding
one module and naming it here."""
from __future__ import annotations

import importlib

NAMES = ("pickle", "loaders", "network", "resource_sharer", "multiprocessing", "threads", "imports", "code", "process", "native", "files", "modelcode", "transformers", "tamper")


def modules():
    return [importlib.import_module(f"{__name__}.{name}") for name in NAMES]
