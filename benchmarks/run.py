#!/usr/bin/env python3
"""tmtguard benchmark harness: guarded vs unguarded (and peers), one fresh process per measurement.

    python3 benchmarks/run.py                 # full run (~15 min on 2 cores)
    python3 benchmarks/run.py --quick         # smoke run (~3 min): fewer rounds and repetitions
    python3 benchmarks/run.py --only pickle_loads,socket_connect --rounds 9
    python3 benchmarks/run.py --list

Prints a Markdown table to stdout (progress goes to stderr) and writes it to
benchmarks/results/latest.md, with the raw numbers in benchmarks/results/latest.json.
See benchmarks/README.md for how to read it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import workloads as W  # noqa: E402
from benchmarks._common import (  # noqa: E402
    AUDIT,
    BASELINE,
    CACHE_DIR,
    ENFORCE,
    PEERS,
    REPO_ROOT,
    RESULTS_DIR,
    Config,
    child_env,
    dist_version,
    fmt_seconds,
    loadavg,
    machine_info,
    median,
    peer_available,
    spread,
    workload_env,
)

CHILD_TIMEOUT_S = 600
FULL_ROUNDS = 5
QUICK_ROUNDS = 2
FULL_TIME_CAP = 4.0  # seconds of timed work per process before stopping early (>= MIN_REPS)
QUICK_TIME_CAP = 1.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _tail(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


# --------------------------------------------------------------------------------------------
# One cell of the plan: a (workload, configuration) pair and everything measured for it
# --------------------------------------------------------------------------------------------


class Cell:
    def __init__(self, mod, cfg: Config):
        self.mod = mod
        self.cfg = cfg
        self.samples: list[float] = []  # one value per round: the median of that process's reps
        self.per_process: list[list[float]] = []  # all timed reps, per round
        self.warmups: list[float] = []
        self.setups: list[float] = []  # untimed setup (imports, fixtures) per process, diagnostics
        self.walls: list[float] = []  # whole child process wall time, diagnostics
        self.errors: list[str] = []
        self.skip_note: str | None = None  # set when the cell is not run at all
        self.guard: dict | None = None

    @property
    def runnable(self) -> bool:
        return self.skip_note is None and not self.errors


def preflight_guard(cfg: Config) -> str | None:
    """None if `import tmtguard` works in a child with this configuration's environment."""
    try:
        p = subprocess.run(
            [sys.executable, "-c", "import tmtguard"],
            env=child_env(cfg),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return "tmtguard not importable: `import tmtguard` timed out"
    if p.returncode != 0:
        return f"tmtguard not importable (exit {p.returncode}): {_tail(p.stderr, 1) or 'no output'}"
    return None


def run_inprocess(cell: Cell, params: dict, reps: int, time_cap: float) -> None:
    tmp_dirs: list[str] = []
    fd, out = tempfile.mkstemp(prefix="bench-", suffix=".json", dir=CACHE_DIR)
    os.close(fd)
    os.unlink(out)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks._worker",
        "--workload",
        cell.mod.NAME,
        "--config",
        cell.cfg.key,
        "--reps",
        str(reps),
        "--time-cap",
        str(time_cap),
        "--params",
        json.dumps(params),
        "--out",
        out,
    ]
    try:
        env = workload_env(cell.cfg, params, tmp_dirs)
        try:
            p = subprocess.run(
                cmd,
                env=env,
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=CHILD_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            cell.errors.append(f"timed out after {CHILD_TIMEOUT_S} s")
            return
        if not os.path.exists(out):
            cell.errors.append(
                f"child exited {p.returncode} without a result: {_tail(p.stderr) or 'no output'}"
            )
            return
        with open(out, encoding="utf-8") as f:
            res = json.load(f)
        if res.get("guard"):
            cell.guard = res["guard"]
        if not res.get("ok"):
            cell.errors.append(res.get("error") or "unknown failure")
            if res.get("traceback"):
                log(res["traceback"].rstrip())
            return
        times = res["times_s"]
        cell.per_process.append(times)
        cell.samples.append(median(times))
        cell.warmups.append(res.get("warmup_s"))
        cell.setups.append(res.get("setup_s"))
    finally:
        if os.path.exists(out):
            os.unlink(out)
        for d in tmp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def run_startup(cell: Cell, params: dict, reps: int) -> None:
    """Time whole interpreter start-ups from here: spawn until the child prints "ready"."""
    times: list[float] = []
    for _ in range(reps):
        tmp_dirs: list[str] = []
        env = workload_env(cell.cfg, params, tmp_dirs)
        cmd = cell.mod.command(params, cell.cfg.key)
        with tempfile.TemporaryFile(mode="w+") as err:
            try:
                t0 = time.perf_counter()
                p = subprocess.Popen(
                    cmd, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=err, text=True,
                )
                line = p.stdout.readline()  # blocks until "ready" (or EOF if the child died)
                dt = time.perf_counter() - t0
                p.stdout.read()
                rc = p.wait(timeout=CHILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                cell.errors.append(f"timed out after {CHILD_TIMEOUT_S} s")
                return
            finally:
                for d in tmp_dirs:
                    shutil.rmtree(d, ignore_errors=True)
            err.seek(0)
            stderr = err.read()
        if rc != 0 or line.strip() != "ready":
            msg = _tail(stderr, 1) or "no output"
            if rc == 3 and "tmtguard not importable" in msg:
                cell.errors.append(msg)
            else:
                cell.errors.append(f"interpreter exited {rc} before ready: {msg}")
            return
        times.append(dt)
    cell.per_process.append(times)
    cell.samples.append(median(times))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def summarize(plan: list[tuple[object, dict | None, str | None, list[Cell]]]) -> list[dict]:
    out = []
    for mod, _params, wl_note, cells in plan:
        base = next((c for c in cells if c.cfg.kind == "baseline"), None)
        base_med = median(base.samples) if base else None
        rows = []
        for c in cells:
            med = median(c.samples)
            ratio = med / base_med if (med is not None and base_med) else None
            note = wl_note or c.skip_note or ("; ".join(dict.fromkeys(c.errors)) if c.errors else "")
            if c.cfg.kind == "guarded":
                if ratio is None:
                    verdict = "not run" if (wl_note or c.skip_note or c.errors) else "—"
                else:
                    verdict = "PASS" if ratio <= mod.BUDGET else "MISS"
                    noise = max(x for x in (spread(c.samples), spread(base.samples), 0.0) if x is not None)
                    if noise > mod.BUDGET - 1:
                        extra = f"noisy: spread {noise:.0%} > budget margin {mod.BUDGET - 1:.0%}"
                        note = f"{note}; {extra}" if note else extra
            elif c.cfg.kind == "baseline":
                verdict = "—" if med is not None else "not run"
            else:
                verdict = "peer" if med is not None else "n/a"
            if c.guard and c.cfg.kind == "guarded" and med is not None:
                g = f"guard {c.guard.get('version') or '?'} activated {c.guard.get('activated')}"
                note = f"{note}; {g}" if note else g
            reps = [len(t) for t in c.per_process]
            rows.append(
                {
                    "config": c.cfg.key,
                    "label": c.cfg.label,
                    "kind": c.cfg.kind,
                    "median_s": med,
                    "ratio": ratio,
                    "budget": mod.BUDGET if c.cfg.kind == "guarded" else None,
                    "verdict": verdict,
                    "spread": spread(c.samples),
                    "rounds": len(c.samples),
                    "reps_per_process": reps,
                    "samples_s": c.samples,
                    "per_process_times_s": c.per_process,
                    "warmups_s": c.warmups,
                    "setups_s": c.setups,
                    "process_walls_s": c.walls,
                    "errors": c.errors,
                    "note": note,
                    "guard": c.guard,
                }
            )
        out.append(
            {
                "name": mod.NAME,
                "title": mod.TITLE,
                "budget": mod.BUDGET,
                "kind": getattr(mod, "KIND", "inprocess"),
                "note": wl_note,
                "rows": rows,
            }
        )
    return out


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _short_note(note: str, limit: int = 240) -> str:
    """First line only (a guard's refusal spells out chain/origin/why on the next lines; the JSON
    keeps everything), capped in length."""
    first = (note or "").strip().splitlines()[0] if (note or "").strip() else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _best(row: dict) -> float | None:
    times = [t for proc in row.get("per_process_times_s") or () for t in proc]
    return min(times) if times else None


def render_markdown(summary: list[dict], meta: dict) -> str:
    L: list[str] = []
    L.append("# tmtguard benchmarks")
    L.append("")
    L.append(
        f"Run {meta['started']} ({meta['duration_s']:.0f} s), `{meta['command']}`: "
        f"{meta['rounds']} round(s){', QUICK (smoke only, not for verdicts)' if meta['quick'] else ''}"
        f"{', partial (--only)' if meta['only'] else ''}."
    )
    L.append("")
    L.append("| machine | |")
    L.append("| --- | --- |")
    for k, v in meta["machine"].items():
        L.append(f"| {k} | {_md_escape(str(v))} |")
    if meta.get("loadavg"):
        cores = os.cpu_count() or 0
        L.append(
            f"| load average (1/5/15 min) | start {meta['loadavg']['start']}, end "
            f"{meta['loadavg']['end']} (on {cores} cores; the benchmark itself adds ~1, more means "
            "other work competed with it) |"
        )
    L.append("")
    counts: dict[str, int] = {}
    for w in summary:
        for r in w["rows"]:
            if r["kind"] == "guarded":
                counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    L.append(
        "Guarded verdicts: "
        + (", ".join(f"{n} {v}" for v, n in sorted(counts.items())) or "none")
        + ". Ratio = median(configuration) / median(baseline); budget applies to guarded rows."
    )
    L.append("")
    L.append("| workload | configuration | median | ratio | budget | verdict | best | best ratio | spread | runs | note |")
    L.append("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | --- |")
    for w in summary:
        first = True
        base_best = next((_best(r) for r in w["rows"] if r["kind"] == "baseline"), None)
        for r in w["rows"]:
            best = _best(r)
            best_ratio = f"{best / base_best:.3f}" if (best is not None and base_best) else "—"
            wl = f"**{_md_escape(w['title'])}**" if first else ""
            first = False
            ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "—"
            budget = f"≤ {r['budget']:.2f}" if r["budget"] is not None else ""
            sp = f"±{r['spread'] / 2:.1%}" if r["spread"] is not None else "—"
            reps = r["reps_per_process"]
            if reps:
                lo, hi = min(reps), max(reps)
                runs = f"{r['rounds']}×{lo}" if lo == hi else f"{r['rounds']}×{lo}–{hi}"
            else:
                runs = "—"
            verdict = f"**{r['verdict']}**" if r["verdict"] in ("PASS", "MISS") else r["verdict"]
            L.append(
                f"| {wl} | {_md_escape(r['label'])} | {fmt_seconds(r['median_s'])} | {ratio} | "
                f"{budget} | {verdict} | {fmt_seconds(best)} | {best_ratio} | {sp} | {runs} | "
                f"{_md_escape(_short_note(r['note']))} |"
            )
    L.append("")
    L.append(
        "median: median over rounds of each process's median repetition (one fresh process per "
        "round and configuration; configurations alternate within every round). spread: ±half of "
        "(max − min) / median across rounds. best: the fastest repetition of all rounds; noise on a "
        "shared machine (other work, steal) only ever adds time, so best ratio is the steadier estimate "
        "of the guard's cost when the spread is wide. runs: rounds × timed repetitions per process (after "
        "one untimed warm-up; start-up: interpreter launches per round)."
    )
    L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, help=f"rounds (default {FULL_ROUNDS}, quick {QUICK_ROUNDS})")
    ap.add_argument("--only", action="append", default=[], help="workload name(s), comma-separated")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer rounds/reps, no peers")
    ap.add_argument("--audit", action="store_true", help="also measure TMTGUARD_MODE=audit")
    ap.add_argument("--no-peers", action="store_true", help="baseline and guarded only")
    ap.add_argument("--peers", action="store_true", help="with --quick: include the peers too")
    ap.add_argument("--all-peers", action="store_true", help="also the slow optional peers (EXTRA_PEERS)")
    ap.add_argument("--list", action="store_true", help="list workloads and exit")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where latest.md/json go")
    ap.add_argument("--render", type=Path, metavar="JSON", help="only re-print the table of a saved run")
    a = ap.parse_args(argv)

    if a.render:
        payload = json.loads(a.render.read_text(encoding="utf-8"))
        print(render_markdown(payload["workloads"], payload["meta"]))
        return 0

    mods = W.all_workloads()
    if a.list:
        for m in mods:
            extra = getattr(m, "EXTRA_PEERS", ())
            peers = ", ".join([*m.PEERS, *(f"{p} (--all-peers)" for p in extra)]) or "-"
            print(f"{m.NAME:18} budget {m.BUDGET:.2f}  peers: {peers}  {m.TITLE}")
        return 0
    only = [n.strip() for o in a.only for n in o.split(",") if n.strip()]
    unknown = [n for n in only if n not in W.ORDER]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; choose from {', '.join(W.ORDER)}")
    if only:
        mods = [m for m in mods if m.NAME in only]
    rounds = a.rounds or (QUICK_ROUNDS if a.quick else FULL_ROUNDS)
    time_cap = QUICK_TIME_CAP if a.quick else FULL_TIME_CAP
    started = _dt.datetime.now().astimezone()
    load_start = loadavg()
    t_start = time.perf_counter()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)

    if "tmtguard" in sys.modules:
        log("WARNING: tmtguard is active in the orchestrator itself (TMTGUARD_MODE set?); "
            "start-up timings include its cost of spawning processes.")

    log(f"tmtguard benchmarks: {len(mods)} workload(s), {rounds} round(s), python {sys.version.split()[0]}")

    guarded = [ENFORCE] + ([AUDIT] if a.audit else [])
    guard_note: dict[str, str | None] = {}
    for g in guarded:
        log(f"preflight: import tmtguard with TMTGUARD_MODE={g.mode} ...")
        guard_note[g.key] = preflight_guard(g)
        log(f"  -> {guard_note[g.key] or 'ok'}")

    plan: list[tuple[object, dict | None, str | None, list[Cell]]] = []
    for m in mods:
        params, wl_note = None, None
        log(f"prepare {m.NAME} ...")
        try:
            params = m.prepare(CACHE_DIR)
        except W.NotAvailable as exc:
            wl_note = f"not yet available: {exc}"
        except Exception as exc:
            wl_note = f"fixture preparation failed: {type(exc).__name__}: {exc}"
        if wl_note:
            log(f"  -> {wl_note}")
        with_peers = not a.no_peers and (a.peers or a.all_peers or not a.quick)
        keys = list(m.PEERS) + (list(getattr(m, "EXTRA_PEERS", ())) if a.all_peers else [])
        peers = [PEERS[k] for k in keys] if with_peers else []
        cells = [Cell(m, c) for c in [BASELINE, *guarded, *peers]]
        for c in cells:
            if wl_note:
                c.skip_note = wl_note
            elif c.cfg.kind == "guarded" and guard_note.get(c.cfg.key):
                c.skip_note = guard_note[c.cfg.key]
            elif c.cfg.kind == "peer":
                ok, why = peer_available(c.cfg)
                if not ok:
                    c.skip_note = why
        plan.append((m, params, wl_note, cells))

    for r in range(rounds):
        for m, params, _wl_note, cells in plan:
            todo = [c for c in cells if c.runnable]
            if not todo:
                continue
            k = r % len(todo)
            todo = todo[k:] + todo[:k]  # a different configuration goes first every round
            reps = m.QUICK_REPS if a.quick else m.REPS
            for c in todo:
                t0 = time.perf_counter()
                if getattr(m, "KIND", "inprocess") == "startup":
                    run_startup(c, params or {}, reps)
                else:
                    run_inprocess(c, params or {}, reps, time_cap)
                wall = time.perf_counter() - t0
                c.walls.append(wall)
                if c.errors:
                    log(f"[round {r + 1}/{rounds}] {m.NAME:16} {c.cfg.key:12} ERROR {c.errors[-1]}")
                else:
                    n = len(c.per_process[-1])
                    log(f"[round {r + 1}/{rounds}] {m.NAME:16} {c.cfg.key:12} "
                        f"{fmt_seconds(c.samples[-1]):>10} ({n} reps, process {wall:.1f} s)")

    duration = time.perf_counter() - t_start
    summary = summarize(plan)
    cmd = " ".join(["python3 benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "duration_s": duration,
        "command": cmd,
        "rounds": rounds,
        "quick": a.quick,
        "only": only,
        "machine": machine_info(),
        "loadavg": {"start": load_start, "end": loadavg()},
        "peer_versions": {d: dist_version(d) for d in ("fickling", "picklescan", "modelscan")},
    }
    md = render_markdown(summary, meta)
    print(md)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "latest.md").write_text(md, encoding="utf-8")
    payload = {"meta": meta, "workloads": summary}
    (a.out_dir / "latest.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    stamp = started.strftime("%Y%m%d-%H%M%S")
    (a.out_dir / f"run-{stamp}.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    log(f"wrote {a.out_dir / 'latest.md'} and {a.out_dir / 'latest.json'} in {duration:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
