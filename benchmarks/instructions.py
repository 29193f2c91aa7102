"""Instruction counts, unguarded vs guarded: the repeatable companion of run.py's wall-clock table.

    python3 benchmarks/instructions.py [--only a,b] [--reps N] [--startup]

Wall-clock ratios on a shared 2-core machine move by tens of percent from run to run; instruction
counts do not. Each workload runs once per configuration under ``valgrind --tool=callgrind``, in the
same worker process run.py uses (same fixtures, same setup, one untimed warm-up), and callgrind
collects only inside ``sys.call_tracing``, which the worker calls around each repetition
(``--collect-atstart=no --toggle-collect=sys_call_tracing*``): interpreter start-up, imports and
fixture setup are not counted. ``--startup`` also counts the whole ``import torch, transformers``
process (start-up is what that workload measures).

What it does not see: time in the kernel (page faults of an mmap, socket system calls) and waiting.
Those are the same guarded or not, so an instruction ratio overstates the guard's share of wall
time, never understates it. Under valgrind everything runs ~50x slower: a workload that imports
torch takes several minutes per configuration.

Results: printed, and written to benchmarks/results/instructions.md (and .json).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import workloads as W  # noqa: E402
from benchmarks._common import (  # noqa: E402
    BASELINE,
    CACHE_DIR,
    ENFORCE,
    REPO_ROOT,
    RESULTS_DIR,
    atomic_target,
    child_env,
    machine_info,
    workload_env,
)

DEFAULT = ("pickle_loads", "socket_connect", "open_compile", "torch_load_many", "torch_load_mmap",
           "from_pretrained", "remote_code")
REPS = {"pickle_loads": 1, "socket_connect": 3, "open_compile": 1, "torch_load_many": 3,
        "torch_load_mmap": 20, "from_pretrained": 5, "remote_code": 5}
TIMEOUT_S = 3600
# Dominated by system calls (connect/accept, mmap page faults): the instruction ratio leaves out the
# kernel's share, the same guarded or not, so it overstates the guard's share of the wall time.
SYSCALL_BOUND = {"socket_connect", "torch_load_mmap"}
_COLLECTED = re.compile(r"Collected\s*:\s*([0-9]+)")
_REFS = re.compile(r"I\s+refs:\s*([0-9,]+)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _valgrind() -> str | None:
    return shutil.which("valgrind")


def _python() -> str:
    # valgrind must run the interpreter itself, not a shell shim (pyenv's python3 is a bash script)
    return os.path.realpath(sys.executable)


def _run_worker(prefix: list, mod, cfg, params: dict, args: list):
    """Run benchmarks._worker for one workload and configuration (under ``prefix``: valgrind, or
    nothing); returns (completed process or None on a timeout, the worker's result dict)."""
    tmp_dirs: list = []
    fd, out = tempfile.mkstemp(prefix="worker-", suffix=".json", dir=CACHE_DIR)
    os.close(fd)
    os.unlink(out)
    cmd = prefix + [_python(), "-m", "benchmarks._worker", "--workload", mod.NAME, "--config", cfg.key,
                    "--params", json.dumps(params), "--out", out] + args
    try:
        p = subprocess.run(cmd, env=workload_env(cfg, params, tmp_dirs), cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=TIMEOUT_S)
        return p, (json.loads(Path(out).read_text()) if os.path.exists(out) else {})
    except subprocess.TimeoutExpired:
        return None, {"error": f"timed out after {TIMEOUT_S} s"}
    finally:
        if os.path.exists(out):
            os.unlink(out)
        for d in tmp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def count_inprocess(mod, cfg, params: dict, reps: int) -> dict:
    p, res = _run_worker([_valgrind(), "--tool=callgrind", "--callgrind-out-file=/dev/null", "--collect-atstart=no",
                          "--toggle-collect=sys_call_tracing*"], mod, cfg, params, ["--reps", str(reps), "--count"])
    m = _COLLECTED.search(p.stderr) if p is not None else None
    if not res.get("ok") or m is None:
        why = res.get("error") or (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": why}
    return {"instructions": int(m.group(1)), "reps": reps, "guard": res.get("guard")}


def cpu_split(mod, cfg, params: dict, reps: int) -> dict:
    """User and system CPU seconds per repetition, from a normal (not valgrind) run of the worker:
    how much of a syscall-bound workload's CPU time is user space, the part instructions count."""
    _p, res = _run_worker([], mod, cfg, params, ["--reps", str(reps), "--time-cap", "60"])
    cpu = res.get("cpu_s") if res.get("ok") else None
    if not cpu:
        return {"error": res.get("error") or "no result"}
    return {"user": sum(u for u, _ in cpu), "system": sum(s for _, s in cpu), "reps": len(cpu)}


SPLIT_ROUNDS = 15
# Workloads whose CPU time is measured directly too (normal runs, user and system time apart), and
# whether the guard makes system calls of its own on them. On a connect it makes none (strace: a
# connect is socket, setsockopt, connect, close and the server's accept4, getsockname, close, guarded
# or not), so its kernel time is the same in both configurations and the instruction ratio implies
# the CPU-time ratio. A remote-code load it does (it resolves, hashes and lists the code files it
# verifies): only the direct measurement covers that.
CPU_SPLIT = {"socket_connect": False, "remote_code": True}


def split_rows(names: list, mods: dict, params_of: dict, rounds: int | None = None) -> dict:
    """For each syscall-bound workload: user/system CPU per repetition, unguarded and guarded (rounds
    alternate the two), and the CPU-time ratio the instruction ratio implies if the guard adds no
    kernel work (it makes no system calls on these paths)."""
    out = {}
    for name in names:
        if name not in CPU_SPLIT or name not in params_of:
            continue
        mod = mods[name]
        sums = {BASELINE.key: [0.0, 0.0, 0], ENFORCE.key: [0.0, 0.0, 0]}
        paired = []  # per round: guarded CPU per repetition / unguarded, the two processes run back to back
        for r in range(rounds or SPLIT_ROUNDS):
            per_rep = {}
            for cfg in ((BASELINE, ENFORCE) if r % 2 == 0 else (ENFORCE, BASELINE)):
                res = cpu_split(mod, cfg, params_of[name], getattr(mod, "REPS", 5))
                if res.get("error"):
                    log(f"  cpu split {name} / {cfg.key}: {res['error']}")
                    continue
                acc = sums[cfg.key]
                acc[0] += res["user"]
                acc[1] += res["system"]
                acc[2] += res["reps"]
                per_rep[cfg.key] = (res["user"] + res["system"]) / res["reps"]
            if len(per_rep) == 2 and per_rep[BASELINE.key] > 0:
                paired.append(per_rep[ENFORCE.key] / per_rep[BASELINE.key])
        if all(v[2] for v in sums.values()):
            out[name] = {key: {"user_ms": v[0] / v[2] * 1e3, "system_ms": v[1] / v[2] * 1e3, "reps": v[2]}
                         for key, v in sums.items()}
            if paired:
                q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
                out[name]["paired"] = {"median": statistics.median(paired), "q1": q[0], "q3": q[2],
                                       "rounds": len(paired), "ratios": paired}
    return out


def count_startup(cfg) -> dict:
    cmd = [_valgrind(), "--tool=callgrind", "--callgrind-out-file=/dev/null", _python(), "-c",
           "import torch, transformers"]
    try:
        p = subprocess.run(cmd, env=child_env(cfg), cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {TIMEOUT_S} s"}
    m = _REFS.search(p.stderr)
    if p.returncode != 0 or m is None:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1]}
    return {"instructions": int(m.group(1).replace(",", "")), "reps": 1}


def render(rows: list, meta: dict) -> str:
    out = ["# tmtguard benchmarks: instruction counts", "",
           f"Run {meta['started']} ({meta['seconds']:.0f} s), `{meta['command']}`. "
           "Instructions counted by callgrind inside each repetition only (see benchmarks/instructions.py); "
           "repeatable, unlike wall time on a shared machine.", "",
           "| machine | |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in meta["machine"].items()]
    out += ["", "Budgets are wall-time budgets. For a CPU-bound workload the instruction ratio is the guard's share; "
            "for one dominated by system calls (marked *syscall-bound*) it leaves out the kernel's share, which "
            "is the same guarded or not, and so overstates the guard's share of the wall time.", "",
            "| workload | per repetition, unguarded | per repetition, tmtguard enforce | ratio | wall budget | "
            "instructions within it |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['title']} | | | | ≤ {r['budget']:.2f} | error: {r['error']} |")
            continue
        verdict = "yes" if r["ratio"] <= r["budget"] else "no"
        if r["workload"] in SYSCALL_BOUND:
            verdict += " (syscall-bound: user space only)"
        out.append(f"| {r['title']} | {r['base']:,.0f} | {r['guarded']:,.0f} | {r['ratio']:.3f} | "
                   f"≤ {r['budget']:.2f} | {verdict} |")
    split_rows_ = [r for r in rows if r.get("cpu_split")]
    if split_rows_:
        out += ["", "**CPU time measured directly.** User and system CPU per repetition (getrusage, normal runs "
                "without valgrind; rounds as the table says, each one process per configuration run back to back, "
                "the order alternating). *Implied*: the CPU-time ratio the instruction ratio implies when the "
                "guard adds no kernel work (its extra user-space instructions at the unguarded run's "
                "user-space speed, over user + system time); a connect qualifies (strace: the same system "
                "calls per connect guarded or not; the C hook and the gated connect are plain function calls), "
                "a remote-code load does not (the guard resolves, hashes and lists the code files it "
                "verifies), so for it only the measurement counts. *Measured*: the ratio of guarded to "
                "unguarded CPU time per repetition in each round, the median over the rounds and the "
                "interquartile range; single rounds on this machine vary by several percent.", "",
                "| workload | unguarded user / system ms | guarded user / system ms | instruction ratio | "
                "implied CPU-time ratio | measured CPU-time ratio: median of rounds (IQR) | budget |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in split_rows_:
            b_, g_ = r["cpu_split"][BASELINE.key], r["cpu_split"][ENFORCE.key]
            pr = r["cpu_split"].get("paired")
            if pr:
                measured = f"{pr['median']:.3f} ({pr['q1']:.3f}-{pr['q3']:.3f}, {pr['rounds']} rounds)"
            else:
                measured = f"{(g_['user_ms'] + g_['system_ms']) / (b_['user_ms'] + b_['system_ms']):.3f}"
            out.append(f"| {r['title']} | {b_['user_ms']:.1f} / {b_['system_ms']:.1f} | "
                       f"{g_['user_ms']:.1f} / {g_['system_ms']:.1f} | {r['ratio']:.3f} | "
                       f"{'—' if r['cpu_estimate'] is None else format(r['cpu_estimate'], '.3f')} | "
                       f"{measured} | ≤ {r['budget']:.2f} |")
    return "\n".join(out) + "\n"


def cpu_only(a) -> int:
    """The direct CPU-time measurement alone, with as many rounds as asked: writes cpu.md / cpu.json."""
    mods = {m.NAME: m for m in W.all_workloads()}
    names = [n.strip() for o in a.only for n in o.split(",") if n.strip()] or list(CPU_SPLIT)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    params_of = {n: mods[n].prepare(CACHE_DIR) for n in names if n in CPU_SPLIT}
    started = _dt.datetime.now().astimezone()
    t0 = time.perf_counter()
    splits = split_rows(names, mods, params_of, a.split_rounds)
    lines = [f"# CPU time, guarded / unguarded, measured directly ({started.isoformat(timespec='seconds')}, "
             f"{time.perf_counter() - t0:.0f} s)", "",
             "Per round, one process per configuration back to back (order alternating), user + system CPU "
             "per repetition (getrusage); the ratio of the two. Median over the rounds, its interquartile "
             "range, and a 95 % bootstrap interval of the median (2,000 resamples).", "",
             "| workload | rounds | unguarded ms | guarded ms | ratio of means | median ratio | IQR | 95 % interval of the median |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    import random

    rng = random.Random(8)
    for name, sp in splits.items():
        pr = sp.get("paired")
        if not pr:
            continue
        ratios = pr["ratios"]
        boots = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
        pr["median_95"] = [boots[49], boots[1949]]
        b_, g_ = sp[BASELINE.key], sp[ENFORCE.key]
        bt, gt = b_["user_ms"] + b_["system_ms"], g_["user_ms"] + g_["system_ms"]
        lines.append(f"| {mods[name].TITLE} | {pr['rounds']} | {bt:.1f} | {gt:.1f} | {gt / bt:.3f} | "
                     f"{pr['median']:.3f} | {pr['q1']:.3f}-{pr['q3']:.3f} | {boots[49]:.3f}-{boots[1949]:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "cpu.md").write_text(text)
    (a.out_dir / "cpu.json").write_text(json.dumps({"machine": machine_info(), "splits": splits}, indent=2))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="workload name(s), comma-separated")
    ap.add_argument("--reps", type=int, help="repetitions per configuration (default: per workload)")
    ap.add_argument("--startup", action="store_true", help="also count `import torch, transformers`")
    ap.add_argument("--jobs", type=int, default=2, help="valgrind processes at once (default 2)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--cpu-only", action="store_true",
                    help="only the direct CPU-time measurement (no valgrind), of the workloads in CPU_SPLIT")
    ap.add_argument("--split-rounds", type=int, help=f"rounds of the CPU-time measurement (default {SPLIT_ROUNDS})")
    a = ap.parse_args(argv)
    if a.cpu_only:
        return cpu_only(a)
    if _valgrind() is None:
        log("valgrind not found (Debian: apt-get install valgrind)")
        return 2
    names = [n.strip() for o in a.only for n in o.split(",") if n.strip()] or list(DEFAULT)
    if a.startup and "startup_import" not in names:
        names.append("startup_import")
    mods = {m.NAME: m for m in W.all_workloads()}
    unknown = [n for n in names if n not in mods]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now().astimezone()
    t0 = time.perf_counter()

    jobs = []  # (name, cfg, thunk)
    rows = {}
    params_of = {}
    for name in names:
        mod = mods[name]
        rows[name] = {"workload": name, "title": mod.TITLE, "budget": mod.BUDGET}
        if getattr(mod, "KIND", "inprocess") == "startup":
            for cfg in (BASELINE, ENFORCE):
                jobs.append((name, cfg, (lambda cfg=cfg: count_startup(cfg))))
            continue
        try:
            params = mod.prepare(CACHE_DIR)
        except Exception as exc:
            rows[name]["error"] = f"fixture preparation failed: {type(exc).__name__}: {exc}"
            continue
        params_of[name] = params
        reps = a.reps or REPS.get(name, 3)
        for cfg in (BASELINE, ENFORCE):
            jobs.append((name, cfg, (lambda mod=mod, cfg=cfg, params=params, reps=reps:
                                     count_inprocess(mod, cfg, params, reps))))

    from concurrent.futures import ThreadPoolExecutor

    def run(job):
        name, cfg, thunk = job
        log(f"counting {name} / {cfg.key} ...")
        t = time.perf_counter()
        res = thunk()
        log(f"  {name} / {cfg.key}: {res.get('instructions', res.get('error'))} ({time.perf_counter() - t:.0f} s)")
        return name, cfg.key, res

    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for name, key, res in pool.map(run, jobs):
            rows[name][key] = res

    log("CPU split (user / system) of the syscall-bound workloads, normal runs ...")
    splits = split_rows(names, mods, params_of, a.split_rounds)

    out_rows = []
    for name in names:
        r = rows[name]
        base, guarded = r.get(BASELINE.key, {}), r.get(ENFORCE.key, {})
        err = r.get("error") or base.get("error") or guarded.get("error")
        if err:
            out_rows.append({**{k: r[k] for k in ("workload", "title", "budget")}, "error": err})
            continue
        b = base["instructions"] / base["reps"]
        g = guarded["instructions"] / guarded["reps"]
        row = {**{k: r[k] for k in ("workload", "title", "budget")}, "base": b, "guarded": g,
               "ratio": g / b, "reps": base["reps"], "guard": guarded.get("guard")}
        split = splits.get(name)
        if split is not None:
            ub, sb = split[BASELINE.key]["user_ms"], split[BASELINE.key]["system_ms"]
            row["cpu_split"] = split
            # the guard's extra user-space instructions, at the unguarded run's user-space speed, over
            # the unguarded CPU time (user + system)
            row["cpu_estimate"] = None if CPU_SPLIT[name] else (ub * g / b + sb) / (ub + sb)
        out_rows.append(row)
    meta = {"started": started.isoformat(timespec="seconds"), "seconds": time.perf_counter() - t0,
            "command": "python3 benchmarks/instructions.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine_info()}
    text = render(out_rows, meta)
    print(text)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, body in ((".md", text), (".json", json.dumps({"meta": meta, "rows": out_rows}, indent=2))):
        target = a.out_dir / f"instructions{suffix}"
        tmp = atomic_target(target)
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
