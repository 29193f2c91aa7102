"""Interpreter start-up with `import torch, transformers`: the whole process, wall clock.

Unlike the other workloads this one is timed from the orchestrator around the child process, from
spawn until the child reports "ready" on stdout after the imports, because start-up is the
workload. The child then leaves with os._exit (teardown is not start-up, and costs seconds here). Guarded runs get TMTGUARD_MODE in the
environment, which activates the guard at interpreter start-up when tmtguard is installed; if it
is only present in the working tree (not installed), the probe imports it first, so the guard's
own import cost is still counted. The probe exits non-zero if a guarded run ends up unguarded.
"""

from __future__ import annotations

import sys
from pathlib import Path

NAME = "startup_import"
TITLE = "start-up: python -c 'import torch, transformers' (whole process)"
BUDGET = 1.10
PEERS = ()
REPS = 2  # interpreter launches per round and configuration
QUICK_REPS = 1
KIND = "startup"

PROBE = (
    "import os, sys\n"
    "if os.environ.get('TMTGUARD_MODE') and 'tmtguard' not in sys.modules:\n"
    "    try:\n"
    "        import tmtguard\n"
    "    except Exception as e:\n"
    "        sys.stderr.write('tmtguard not importable: %s: %s\\n' % (type(e).__name__, e))\n"
    "        sys.exit(3)\n"
    "import torch, transformers\n"
    "sys.stdout.write('ready\\n')\n"
    "sys.stdout.flush()\n"
    "os._exit(0)\n"
)


def prepare(cache_dir: Path) -> dict:
    return {}


def command(params: dict, config: str) -> list[str]:
    return [sys.executable, "-c", PROBE]
