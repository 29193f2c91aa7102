"""Remote-code loads guarded and unguarded in ONE process, alternating: the guard's cost without the
process-to-process spread (single unguarded processes run the same loads 15-20 % apart on a shared VM).

    python3 benchmarks/remote_code_ab.py [--loads 160] [--keep-caches]

Builds (or reuses) the remote_code workload's offline hub cache, activates tmtguard in enforce with
the workload's allowlist, then loads a new repo each time, two guarded (``tmtguard.activate``) and two
unguarded (``tmtguard.deactivate``) in turn, with a ``gc.collect()`` before each, as the benchmark
worker does. "Unguarded" here still has tmtguard's C audit hook installed (it cannot be removed), so
CPython builds every audit event's arguments in both phases: the difference is the guards' own work,
not the price of having an audit hook (which the instruction count covers: see benchmarks/README.md).
It also times the patched transformers functions in both phases (thread CPU time, inclusive).

Caveat: re-activating every two loads drops the guard's caches (the file guard's read settings among
them), so the guarded phase includes some work a process that stays guarded does not repeat.
``--keep-caches`` measures the steady state instead: tmtguard stays active and only the remote-code
guard's hooks are switched (``tmtguard.guards.transformers._on``), so every other guard, its caches and
the model code registered by earlier guarded loads stay in both phases (with that guard's hooks off,
transformers' remote code runs undecided and unregistered, as in an unguarded process; the "unguarded"
phase still pays the C hook's model-code walks for earlier models, ~30k instructions a load by callgrind).
"""
from __future__ import annotations

import argparse
import collections
import functools
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    # appended, not prepended: ``import tmtguard`` must find the installed package (its C audit hook),
    # not the source tree, which has no built extension and would measure the Python hook
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks._common import CACHE_DIR  # noqa: E402
from benchmarks.workloads import remote_code as W  # noqa: E402

NAMES = ("get_cached_module_file", "check_imports", "get_class_in_module")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", type=int, default=160, help="loads in all, half of them guarded (default 160)")
    ap.add_argument("--keep-caches", action="store_true",
                    help="stay activated; switch only the remote-code guard's hooks between phases")
    a = ap.parse_args()
    params = W.prepare(CACHE_DIR, n_repos=a.loads + 1, folder="hub-ab")
    os.environ.update(params["env"])
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="tmtguard-ab-modules-")
    allow = params["guarded_env"]["TMTGUARD_ALLOWLIST"]
    import tmtguard
    from tmtguard.guards import _audit
    from tmtguard.guards import transformers as remote_guard

    tmtguard.activate(mode="enforce", allowlists=[allow])
    hook = "C" if getattr(_audit, "_fast", None) is not None else "Python (no built extension: numbers users do not see)"
    print(f"tmtguard from {Path(tmtguard.__file__).parent}, audit hook {hook}")
    import torch  # noqa: F401
    import transformers.dynamic_module_utils as dmu
    from transformers import AutoModel, PretrainedConfig, PreTrainedModel  # noqa: F401

    repos = [W._repo(i) for i in range(params["n"])]  # prepare built one per load + the warm-up
    AutoModel.from_pretrained(repos[0], trust_remote_code=True)  # warm-up
    gc.collect()
    gc.freeze()
    parts = {True: collections.Counter(), False: collections.Counter()}
    runs = {True: [], False: []}

    def timed(name, f, acc):
        @functools.wraps(f)
        def w(*args, **kwargs):
            t = time.thread_time()
            try:
                return f(*args, **kwargs)
            finally:
                acc[name] += time.thread_time() - t
        return w

    collector = {True: [0, 0.0], False: [0, 0.0]}  # collections during loads, their time
    phase = [None, 0.0]

    def on_gc(stage, info):
        if phase[0] is None:
            return
        if stage == "start":
            phase[1] = time.perf_counter()
        else:
            collector[phase[0]][0] += 1
            collector[phase[0]][1] += time.perf_counter() - phase[1]

    gc.callbacks.append(on_gc)
    for i in range(1, a.loads + 1):
        guarded = (i // 2) % 2 == 0
        if a.keep_caches:
            remote_guard._on = guarded
        elif guarded:
            tmtguard.activate(mode="enforce", allowlists=[allow])
        else:
            tmtguard.deactivate()
        saved = {n: getattr(dmu, n) for n in NAMES}
        for n in NAMES:
            setattr(dmu, n, timed(n, saved[n], parts[guarded]))
        gc.collect()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        phase[0] = guarded
        AutoModel.from_pretrained(repos[i], trust_remote_code=True)
        phase[0] = None
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        for n in NAMES:
            setattr(dmu, n, saved[n])
        runs[guarded].append((wall, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime))
    tmtguard.deactivate()
    n = {k: len(v) for k, v in runs.items()}
    wall = {k: statistics.median(x[0] for x in v) * 1e3 for k, v in runs.items()}
    cpu = {k: statistics.mean(x[1] for x in v) * 1e3 for k, v in runs.items()}
    how = "the remote-code guard's hooks switched, caches kept" if a.keep_caches else "activate/deactivate"
    print(f"{a.loads} loads in one process, {n[True]} guarded / {n[False]} unguarded, alternating in pairs ({how})")
    print(f"wall median   guarded {wall[True]:7.2f} ms  unguarded {wall[False]:7.2f} ms  ratio {wall[True] / wall[False]:.3f}")
    print(f"CPU mean      guarded {cpu[True]:7.2f} ms  unguarded {cpu[False]:7.2f} ms  ratio {cpu[True] / cpu[False]:.3f}")
    (cg, tg), (cu, tu) = collector[True], collector[False]
    print(f"collector     guarded {cg / n[True]:.2f} collections, {tg / n[True] * 1e3:.3f} ms a load; "
          f"unguarded {cu / n[False]:.2f}, {tu / n[False] * 1e3:.3f} ms")
    for name in NAMES:
        g, u = parts[True][name] / n[True] * 1e3, parts[False][name] / n[False] * 1e3
        print(f"  {name:24s} guarded {g:6.2f} ms  unguarded {u:6.2f} ms  (+{g - u:.2f}; inclusive, thread CPU)")
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)
