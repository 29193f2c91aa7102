"""Child process: run ONE workload in ONE configuration and write a JSON result.

    python -m benchmarks._worker --workload NAME --config KEY --reps N --params JSON --out FILE

Order inside the process (everything before step 4 is untimed):
1. (guarded configs) make sure tmtguard is active: it normally activated at interpreter start-up
   from TMTGUARD_MODE; if not, ``import tmtguard`` activates it. Failure -> graceful error result.
2. import the workload module (cheap, no heavy imports at module level)
3. ``fn = workload.setup(params, config)``: fixtures, heavy imports, peer activation
4. one warm-up ``fn()``, gc.freeze(), then ``fn()`` timed with time.perf_counter up to N times (stopping early,
   after at least MIN_REPS, once TIME_CAP seconds of timed work are spent)

The result is written to --out rather than stdout so that anything the guard or a peer prints
cannot corrupt it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
import traceback

MIN_REPS = 3  # timed repetitions always done (2 when the warm-up alone exceeded the time cap)


def _write(out: str, payload: dict) -> None:
    tmp = out + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    os.replace(tmp, out)


def _guard_state(startup_active: bool) -> dict:
    import tmtguard  # already imported by the caller

    state: dict = {
        "activated": "at interpreter start-up" if startup_active else "by `import tmtguard`",
        "version": getattr(tmtguard, "__version__", None),
        "file": getattr(tmtguard, "__file__", None),
    }
    status = getattr(tmtguard, "status", None)
    if callable(status):
        try:
            s = status()
            json.dumps(s)  # keep only if JSON-able
            state["status"] = s
        except Exception as exc:  # status is informative only
            state["status"] = f"status() failed: {type(exc).__name__}: {exc}"
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--reps", type=int, required=True)
    p.add_argument("--time-cap", type=float, default=4.0)
    p.add_argument("--params", default="{}")
    p.add_argument("--out", required=True)
    p.add_argument("--count", action="store_true",
                   help="for benchmarks/instructions.py: run each repetition inside sys.call_tracing, the "
                        "one call callgrind collects (--toggle-collect=sys_call_tracing*), and time nothing")
    a = p.parse_args(argv)

    result: dict = {
        "workload": a.workload,
        "config": a.config,
        "ok": False,
        "pid": os.getpid(),
        "tmtguard_mode_env": os.environ.get("TMTGUARD_MODE"),
    }
    stage = "guard activation"
    try:
        from benchmarks._common import ALL_CONFIGS

        cfg = ALL_CONFIGS[a.config]
        if cfg.kind == "guarded":
            startup_active = "tmtguard" in sys.modules
            try:
                import tmtguard  # noqa: F401  (activates the guard if start-up did not)
            except Exception as exc:
                result["error"] = f"tmtguard not importable: {type(exc).__name__}: {exc}"
                result["traceback"] = traceback.format_exc()
                _write(a.out, result)
                return 0
            result["guard"] = _guard_state(startup_active)
        elif "tmtguard" in sys.modules:
            result["error"] = "tmtguard is active in an unguarded configuration (TMTGUARD_* leaked?)"
            _write(a.out, result)
            return 0

        stage = "workload import"
        from benchmarks import workloads

        mod = workloads.load(a.workload)

        stage = "setup"
        t0 = time.perf_counter()
        fn = mod.setup(json.loads(a.params), a.config)
        result["setup_s"] = time.perf_counter() - t0

        stage = "warm-up"
        t0 = time.perf_counter()
        fn()
        result["warmup_s"] = time.perf_counter() - t0

        if a.count:
            stage = "counted runs"
            gc.collect()
            gc.freeze()
            for _ in range(a.reps):
                sys.call_tracing(fn, ())
            result["reps"] = a.reps
            result["ok"] = True
            _write(a.out, result)
            return 0

        stage = "timed runs"
        # Move everything alive now (modules, fixtures, the guard's own state) out of the GC's
        # reach, as pre-forking servers do, so the per-repetition gc.collect() below is cheap (it
        # takes ~0.1 s with torch+transformers loaded otherwise) and no full collection of import
        # debris lands inside a timed repetition. Applies to every configuration alike.
        gc.collect()
        gc.freeze()
        times: list[float] = []
        cpu: list[tuple[float, float]] = []  # (user, system) CPU seconds of the whole process, per repetition
        spent = 0.0
        min_reps = min(a.reps, 2 if result["warmup_s"] > a.time_cap else MIN_REPS)
        for i in range(a.reps):
            if i >= min_reps and spent >= a.time_cap:
                break
            gc.collect()
            c0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            c1 = resource.getrusage(resource.RUSAGE_SELF)
            times.append(dt)
            cpu.append((c1.ru_utime - c0.ru_utime, c1.ru_stime - c0.ru_stime))
            spent += dt
        result["times_s"] = times
        result["cpu_s"] = cpu
        result["ok"] = True
    except BaseException as exc:  # report everything, including a guard's refusal
        result["error"] = f"{stage} failed: {type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    _write(a.out, result)
    return 0


if __name__ == "__main__":
    rc = main()
    # Skip interpreter teardown (seconds with torch/transformers loaded on a small machine): the
    # result is already on disk and nothing after this point is measured.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
