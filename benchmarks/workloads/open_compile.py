"""50,000 open + compile calls from application code: 25,000 x (open + read, compile).

Both calls raise audit events ("open", "compile") and are the kind of thing a guard hooks to watch
file access and dynamic code. The file is a tiny Python module under benchmarks/.cache/, so that
open and compile cost about the same (~15-20 us each here) and a per-call hook is not hidden by a
long compile. The ratio does not depend on the count; 25,000 pairs keep one repetition ~1 s.
"""

from __future__ import annotations

import os
from pathlib import Path

NAME = "open_compile"
N_CALLS = 50_000  # calls in total: N_CALLS // 2 opens and N_CALLS // 2 compiles
TITLE = f"open + compile, {N_CALLS:,} calls (tiny .py file)"
BUDGET = 1.10
PEERS = ()
REPS = 7
QUICK_REPS = 3
KIND = "inprocess"

SOURCE = "SCALE = 3\nf = lambda x: x * SCALE + 1\n"


def prepare(cache_dir: Path) -> dict:
    from benchmarks._common import atomic_target

    path = cache_dir / "open_compile_sample.py"
    if not path.exists() or path.read_text() != SOURCE:
        tmp = atomic_target(path)
        tmp.write_text(SOURCE)
        os.replace(tmp, path)
    return {"path": str(path), "pairs": N_CALLS // 2}


def setup(params: dict, config: str):
    path = params["path"]
    n = params["pairs"]

    def run():
        code = None
        for _ in range(n):
            with open(path, encoding="utf-8") as f:
                src = f.read()
            code = compile(src, path, "exec")
        assert code is not None

    return run
