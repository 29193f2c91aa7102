"""``tmtguard run``: start a program under the guard with no code change.

The child gets the ``TMTGUARD_*`` settings in its environment and tmtguard's ``sitecustomize``
folder first on ``PYTHONPATH`` (the way ``opentelemetry-instrument`` and ``ddtrace-run`` work), then
the command replaces this process. Every Python process started from it inherits both -- DataLoader
workers, ``multiprocessing`` spawns, a ``subprocess`` running Python -- unless a program hands its
child a fresh environment.
"""
from __future__ import annotations

import os
import shutil
import sys

from . import config

BOOTSTRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_startup", "bootstrap")
EXIT_CONFIG = 78  # EX_CONFIG: a setting tmtguard cannot use
EXIT_NOT_FOUND = 127  # as a shell says "command not found"


def child_environment(base: dict, *, mode=None, allowlists=(), events=None, otel_exporter=None) -> dict:
    """The environment for the child: ``base`` with the settings applied and the bootstrap folder
    first on PYTHONPATH (once, however often ``tmtguard run`` is nested). Paths are made absolute,
    since the child may change directory."""
    env = dict(base)
    if mode is not None:
        env[config.TMTGUARD_MODE] = mode
    elif not (env.get(config.TMTGUARD_MODE) or "").strip():
        env[config.TMTGUARD_MODE] = "enforce"
    if allowlists:
        env[config.TMTGUARD_ALLOWLIST] = os.pathsep.join(os.path.abspath(p) for p in allowlists)
    if events is not None:
        env[config.TMTGUARD_EVENTS] = os.path.abspath(events)
    if otel_exporter is not None:
        env[config.TMTGUARD_OTEL_EXPORTER] = otel_exporter
    entries = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != BOOTSTRAP]
    env["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP] + entries)
    return env


def check_settings(env: dict) -> str | None:
    """What is wrong with the child's settings (the reason, for the user), or None when they work.
    Checked here so that a typo is reported once, before the program starts, not in every child."""
    from .policy import Policy

    try:
        settings = config.from_environment(env)
        if settings.mode == "off":
            return None
        Policy.from_files(settings.allowlists, builtins=settings.builtins)
        if settings.events:
            fd = os.open(settings.events, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.close(fd)
    except config.ConfigError as exc:
        return str(exc)
    except OSError as exc:
        return f"{config.TMTGUARD_EVENTS}={env.get(config.TMTGUARD_EVENTS)!r}: cannot open the events file: {exc.strerror or exc}"
    return None


def run(command: list, env: dict) -> int:
    """Check the settings, then exec ``command`` with ``env``. Returns only when it cannot start."""
    from . import provenance

    with provenance.internal():
        problem = check_settings(env)
    if problem:
        try:
            mode = config.requested_mode(env) or "enforce"
        except config.ConfigError:
            mode = "enforce"
        print(f"tmtguard run: {problem}", file=sys.stderr)
        if mode != "audit":
            print(f"tmtguard run: refusing to start {command[0]!r} unguarded (mode {mode})", file=sys.stderr)
            return EXIT_CONFIG
        print("tmtguard run: audit mode: starting it anyway; the guard falls back to what it can use",
              file=sys.stderr)
    executable = shutil.which(command[0], path=env.get("PATH")) if os.sep not in command[0] else command[0]
    if executable is None:
        print(f"tmtguard run: command not found: {command[0]}", file=sys.stderr)
        return EXIT_NOT_FOUND
    sys.stdout.flush()
    sys.stderr.flush()
    # tmtguard's own work: with TMTGUARD_PROCESS_WIDE=1 the process guard must not police this exec.
    with provenance.internal():
        try:
            os.execve(executable, command, env)
        except OSError as exc:
            print(f"tmtguard run: cannot run {command[0]!r}: {exc.strerror or exc}", file=sys.stderr)
            return 126 if isinstance(exc, PermissionError) else EXIT_NOT_FOUND
    return EXIT_NOT_FOUND  # not reached
