"""The process guard: processes started by guarded loads and model code (``process.spawn``).

PEP 578 events, raised before the process starts, whatever reference the caller holds:
``os.system``, ``subprocess.Popen`` (``subprocess.*``, ``os.popen``), ``os.exec`` (``os.exec*``),
``os.posix_spawn`` (``os.posix_spawn*``), ``pty.spawn``, ``os.fork`` and ``os.forkpty``.

Patches where no event names the program: ``_posixsubprocess.fork_exec`` (raises no event; what
``multiprocessing`` uses to start its spawn and forkserver processes) and ``os._spawnvef`` (behind
every ``os.spawn*``, which would otherwise show only as a bare ``os.fork``).

A spawn is allowed when ``process.allow`` names the executable (its path, or its name anywhere on
PATH). A shell command (``os.system``, ``shell=True``) is decided on its first word when it is one
simple command (no ``;``, ``|``, ``$``, quotes, redirections...); anything else runs a shell, which can
run anything, and needs the shell itself (``sh``) allowed. A fork that execs nothing needs ``os.fork``.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading

import _posixsubprocess

from .. import decision
from ..decision import ProcessViolation
from . import _audit, _scope

_on = False
_policy = None
_tls = threading.local()  # argv: the argv a Popen event decided; fork_ok: a decided spawn forks next
_patched: list = []  # (owner, attribute, original, replacement)

_chain = _scope._chain
_lazy = _scope._lazy
_model_code = _scope._model_code
_wide = _scope.wide

_SHELLS = frozenset(("sh", "bash", "dash", "zsh", "ksh", "ash", "busybox"))
_SHELL_SYNTAX = frozenset(";&|<>()$`\\\"'*?[]#~=%!{}\n\r")

_original_fork_exec = _posixsubprocess.fork_exec
_original_spawnvef = getattr(os, "_spawnvef", None)


def _quiet() -> bool:
    return not _chain() and not _model_code and not _wide.on


# --- audit events ----------------------------------------------------------------------------------


def _on_system(args):
    if _quiet():
        return
    command = _scope.text(args[0], 10_000)
    _check(*_shell_command(command), via="os.system", detail={"command": _scope.text(command)})


def _on_popen(args):
    if _quiet():
        return
    executable, argv = args[0], args[1]
    argv = list(argv) if isinstance(argv, (list, tuple)) else [argv]
    _check_argv(executable, argv, "subprocess.Popen", cwd=args[2])
    _tls.argv = args[1]


def _on_posix_spawn(args):
    if _quiet():
        return
    if args[1] is getattr(_tls, "argv", None):
        _tls.argv = None  # subprocess.Popen's own posix_spawn: already decided
        return
    _check_argv(args[0], list(args[1]), "os.posix_spawn")


def _on_exec(args):
    if _quiet():
        return
    path = _scope.text(args[0], 4096)
    f = _scope.frame(2)
    if f is not None and f.f_code.co_name == "_execvpe":
        # os.exec*p tries every PATH folder in turn: decide the name once, not each candidate
        path = os.path.basename(path)
    _check_argv(path, list(args[1]) if args[1] is not None else [path], "os.exec")


def _on_pty_spawn(args):
    if _quiet():
        return
    argv = args[0]
    argv = [argv] if isinstance(argv, (str, bytes)) else list(argv)
    _check_argv(_scope.text(argv[0]) if argv else "?", argv, "pty.spawn")
    _tls.fork_ok = True


def _on_fork(args):
    if _quiet():
        return
    if getattr(_tls, "fork_ok", False):
        _tls.fork_ok = False  # the fork of a spawn decided by its program (os.spawn*, pty.spawn)
        return
    _check("os.fork", "os.fork", via="os.fork", detail={})


def _on_forkpty(args):
    if _quiet():
        return
    if getattr(_tls, "fork_ok", False):
        _tls.fork_ok = False
        return
    _check("os.forkpty", "os.forkpty", via="os.forkpty", detail={})


# --- patches ---------------------------------------------------------------------------------------


def fork_exec(args, executable_list, *rest):
    if not _quiet() and _on:
        program = _program(executable_list) or (_scope.text(args[0]) if args else "?")
        _check_argv(program, list(args or ()), "_posixsubprocess.fork_exec")
    return _original_fork_exec(args, executable_list, *rest)


def _spawnvef(mode, file, args, env, func):
    if not _quiet() and _on:
        _check_argv(_scope.text(file), list(args), "os.spawn*")
        _tls.fork_ok = True
    return _original_spawnvef(mode, file, args, env, func)


fork_exec._tmtguard_original = _original_fork_exec
_spawnvef._tmtguard_original = _original_spawnvef


def _program(executable_list) -> str | None:
    # the first candidate that exists is what the child will exec
    for candidate in executable_list or ():
        path = os.fsdecode(candidate)
        if os.access(path, os.X_OK):
            return path
    return os.fsdecode(executable_list[0]) if executable_list else None


# --- deciding --------------------------------------------------------------------------------------


def _shell_command(command: str) -> tuple[str, str]:
    """(executable to decide, target) for a shell command line."""
    words = command.split()
    if words and not (_SHELL_SYNTAX & set(command)):
        return words[0], words[0]
    return "/bin/sh", "/bin/sh"


def _check_argv(executable, argv: list, via: str, cwd=None) -> None:
    executable = _scope.text(executable if executable is not None else (argv[0] if argv else "?"), 4096)
    detail = {"argv": [_scope.text(a) for a in argv[:12]]}
    if cwd is not None:
        detail["cwd"] = _scope.text(cwd)
    if os.path.basename(executable) in _SHELLS and len(argv) >= 3 and _scope.text(argv[1]) == "-c":
        command = _scope.text(argv[2], 10_000)
        detail["command"] = _scope.text(command)
        program, target = _shell_command(command)
        if program != "/bin/sh":
            _check(program, target, via=via, detail=detail)
            return
    _check(executable, executable, via=via, detail=detail)


def _check(executable: str, target: str, *, via: str, detail: dict) -> None:
    if not _on or _lazy.internal:
        return
    chain = _scope.checked_chain()
    if chain is None:
        return
    try:
        resolved = executable if ("/" in executable or executable.startswith("os.")) else shutil.which(executable)
        for candidate in (executable, resolved):
            if candidate and _policy.process_allowed(candidate, chain) is not None:
                return
        entry = resolved or executable
        if os.path.basename(executable) in _SHELLS:
            warning = "a shell runs whatever command it is given"
        else:
            warning = None
        detail = dict(detail, via=via)
        if resolved and resolved != executable:
            detail["executable"] = resolved
        shell = " (a shell command line: the shell runs whatever it is given)" if warning else ""
        _scope.refuse(
            "process.spawn", target,
            f"tried to start {target!r} ({via}){shell}, and no process.allow rule names it",
            chain, section="process", entry=entry, violation=ProcessViolation, detail=detail,
            warning=warning,
        )
    except decision.Violation:
        raise
    except Exception as exc:
        decision.failed("process.spawn", target, exc, violation=ProcessViolation)


_EVENTS = {
    "os.system": _on_system,
    "subprocess.Popen": _on_popen,
    "os.posix_spawn": _on_posix_spawn,
    "os.exec": _on_exec,
    "pty.spawn": _on_pty_spawn,
    "os.fork": _on_fork,
    "os.forkpty": _on_forkpty,
}


def _replace(owner, attr: str, replacement) -> None:
    current = getattr(owner, attr, None)
    if current is None or current is replacement:
        return
    _patched.append((owner, attr, current, replacement))
    setattr(owner, attr, replacement)


def install(policy) -> None:
    global _on, _policy
    _policy = policy
    _scope.configure()
    if not _patched:
        _replace(_posixsubprocess, "fork_exec", fork_exec)
        if _original_spawnvef is not None:
            _replace(os, "_spawnvef", _spawnvef)
    for event, handler in _EVENTS.items():
        _audit.register(event, handler, scope=_audit.WIDE)
    _on = True


def uninstall() -> None:
    global _on
    _on = False
    for event in _EVENTS:
        _audit.unregister(event)
    while _patched:
        owner, attr, original, replacement = _patched.pop()
        if getattr(owner, attr, None) is replacement:
            setattr(owner, attr, original)


def patches() -> list:
    """(owner, attribute, replacement) this guard keeps in place (the tamper guard checks them)."""
    return [(owner, attr, replacement) for owner, attr, _orig, replacement in _patched]
