"""Workload registry.

Each workload is one module in this package exposing:

NAME        str    id used by ``--only`` and in the JSON
TITLE       str    what the table shows
BUDGET      float  max allowed guarded/unguarded ratio
PEERS       tuple  peer config keys that apply (see benchmarks._common.PEERS)
EXTRA_PEERS tuple  optional: peers that apply but are too slow for the default run (--all-peers)
REPS        int    timed repetitions per process (after one untimed warm-up) in a full run
QUICK_REPS  int    the same for ``--quick``
KIND        str    "inprocess" (default): the worker calls ``setup`` then times the callable it
                   returns; "startup": the orchestrator times whole interpreter runs of
                   ``command(params, config)``
prepare(cache_dir) -> dict   build/cached fixtures, in the orchestrator, unguarded; may raise
                             NotAvailable. The dict (JSON-able) is handed to the worker.
setup(params, config) -> fn  in the fresh child, after the guard/peer is active; untimed.
                             ``fn()`` is one timed repetition.

Heavy imports (torch, transformers, peers) happen inside the functions, never at module level,
so the orchestrator can list and prepare workloads cheaply.
"""

from __future__ import annotations

import importlib
from types import ModuleType

ORDER = (
    "torch_load_many",
    "torch_load_mmap",
    "pickle_loads",
    "socket_connect",
    "open_compile",
    "startup_import",
    "from_pretrained",
    "remote_code",
)


class NotAvailable(RuntimeError):
    """The workload cannot run here yet (missing fixture builder, ...)."""


def load(name: str) -> ModuleType:
    if name not in ORDER:
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}")


def all_workloads() -> list[ModuleType]:
    return [load(n) for n in ORDER]
