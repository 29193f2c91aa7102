"""Shared helpers for the benchmark orchestrator (run.py) and its child processes (_worker.py).

Nothing here imports torch/transformers or tmtguard at module level: the orchestrator must stay
light and unguarded, and the workers must control exactly when the guard and heavy libraries load.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"
RESULTS_DIR = BENCH_DIR / "results"


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    key: str  # short id used on the command line, in JSON and by workloads
    label: str  # what the Markdown table shows
    kind: str  # "baseline" | "guarded" | "peer"
    mode: str | None = None  # TMTGUARD_MODE for guarded configs
    module: str | None = None  # importable module a peer needs (None: always available)
    dist: str | None = None  # distribution name for the version column


BASELINE = Config("baseline", "baseline (unguarded)", "baseline")
ENFORCE = Config("enforce", "tmtguard enforce", "guarded", mode="enforce")
AUDIT = Config("audit", "tmtguard audit", "guarded", mode="audit")

# Peers: other ways of making the same load safer. A workload lists the ones that apply to it.
PEERS = {
    "weights_only": Config(
        "weights_only", "peer: torch.load(weights_only=True)", "peer", module="torch", dist="torch"
    ),
    "fickling": Config(
        "fickling",
        "peer: fickling activate_safe_ml_environment()",
        "peer",
        module="fickling",
        dist="fickling",
    ),
    "picklescan": Config(
        "picklescan", "peer: picklescan scan + load", "peer", module="picklescan", dist="picklescan"
    ),
    "modelscan": Config(
        "modelscan", "peer: modelscan scan + load", "peer", module="modelscan", dist="modelscan"
    ),
}

ALL_CONFIGS = {c.key: c for c in (BASELINE, ENFORCE, AUDIT, *PEERS.values())}


def dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def peer_available(cfg: Config) -> tuple[bool, str]:
    """Whether a peer's package can be imported here, without importing it."""
    if cfg.module is None:
        return True, ""
    if importlib.util.find_spec(cfg.module) is None:
        return False, f"n/a: `{cfg.module}` not installed (pip install {cfg.dist})"
    return True, ""


def child_env(cfg: Config) -> dict[str, str]:
    """Environment for a child process running configuration ``cfg``.

    Baseline and peers get every TMTGUARD_* variable removed (so the guard can never activate at
    interpreter start-up); guarded configs get TMTGUARD_MODE set and keep any other TMTGUARD_*
    settings the user exported (policy files etc.).
    """
    env = dict(os.environ)
    if cfg.kind == "guarded":
        env["TMTGUARD_MODE"] = cfg.mode or "enforce"
    else:
        for k in [k for k in env if k.startswith("TMTGUARD_")]:
            del env[k]
    # The installed tmtguard is what users run (its bytecode compiled at install, its C audit hook
    # built): the repo root goes on PYTHONPATH only when tmtguard is not installed. Children run with
    # cwd=REPO_ROOT, and `-m`/`-c` put the cwd on sys.path only after the start-up hook has imported
    # the installed package, so `benchmarks` is found either way.
    if not dist_version("tmtguard"):
        pp = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
    # Hub access is never wanted: every fixture is local.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return env


def workload_env(cfg: Config, params: dict, tmp_dirs: list) -> dict[str, str]:
    """child_env(cfg) plus what the workload's prepare() asked for: its own variables, guarded-only
    settings (an allowlist for its fixtures, layered on the user's), and fresh empty folders (e.g.
    HF_MODULES_CACHE), recorded in ``tmp_dirs`` for the caller to remove."""
    import tempfile

    env = child_env(cfg)
    env.update(params.get("env", {}))
    if cfg.kind == "guarded":
        for var, value in params.get("guarded_env", {}).items():
            if var == "TMTGUARD_ALLOWLIST" and env.get(var):
                value = env[var] + os.pathsep + value
            env[var] = value
    for var in params.get("fresh_dir_env", []):
        d = tempfile.mkdtemp(prefix="bench-", dir=CACHE_DIR)
        tmp_dirs.append(d)
        env[var] = d
    return env


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def spread(xs: list[float]) -> float | None:
    """(max - min) / median across rounds: a crude, honest noise indicator."""
    if len(xs) < 2:
        return None
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m if m else None


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


# --------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    kb = int(line.split()[1])
                    return f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def loadavg() -> str:
    """1/5/15-minute load averages: how busy the machine was (other work skews every number)."""
    try:
        with open("/proc/loadavg", encoding="utf-8") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def _git_commit() -> str:
    """HEAD commit read from .git directly (the harness never runs git)."""
    git = REPO_ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:12]
        ref = head.split(None, 1)[1]
        p = git / ref
        if p.exists():
            return p.read_text().strip()[:12]
        packed = git / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0][:12]
        return f"(no commit yet on {ref.rsplit('/', 1)[-1]})"
    except OSError:
        return "unknown"


def _tmtguard_install() -> str:
    """Version, how it is installed (the start-up row pays for compiling tmtguard's modules when it runs
    from a source tree without bytecode), and which audit hook it will use."""
    import json

    version = dist_version("tmtguard")
    if not version:
        return "working tree (not pip-installed)" if (REPO_ROOT / "tmtguard").is_dir() else "absent"
    how = "pip-installed"
    try:
        from importlib.metadata import distribution

        direct = json.loads(distribution("tmtguard").read_text("direct_url.json") or "{}")
        if direct.get("dir_info", {}).get("editable"):
            how = "editable install (source tree: run `pip install .` for numbers users see)"
    except Exception:
        pass
    try:  # the installed package's files (the orchestrator itself may import the source tree)
        from importlib.metadata import distribution

        native = any(str(f).startswith("tmtguard/_auditfast") and str(f).endswith((".so", ".pyd"))
                     for f in distribution("tmtguard").files or ())
    except Exception:
        native = False
    return f"{version}, {how}, audit hook {'C' if native else 'Python'}"


def machine_info() -> dict[str, str]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count() or 0
    info = {
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} logical ({usable} usable by this process)",
        "memory": _mem_total(),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "torch": dist_version("torch") or "not installed",
        "transformers": dist_version("transformers") or "not installed",
        "numpy": dist_version("numpy") or "not installed",
        "tmtguard": _tmtguard_install(),
        "peers": ", ".join(
            f"{d} {dist_version(d) or 'n/a'}" for d in ("fickling", "picklescan", "modelscan")
        ),
        "repo commit": _git_commit(),
    }
    return info


def atomic_target(path: Path) -> Path:
    """A temp sibling of ``path`` to write into, then ``os.replace(tmp, path)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")
