"""The one place where an attempted action becomes allowed, blocked or audited.

Guards call :func:`refuse` only after the policy found no rule for an action (the allowed path never
gets here, so it costs nothing). ``refuse`` builds the :class:`Decision`, hands it to the sinks and,
in ``enforce``, raises the guard's :class:`Violation` subclass.
"""
from __future__ import annotations

import errno
import pickle

from . import events, provenance


class Violation(PermissionError):
    """An action tmtguard blocked. The message says what was attempted, by which chain of loads,
    why, and the allowlist lines that would permit it; ``.decision`` holds the structured record."""

    def __init__(self, message: str, decision=None):
        super().__init__(message)
        self.decision = decision

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class PickleViolation(Violation, pickle.UnpicklingError):
    """A pickle named a global no allowlist permits (also a ``pickle.UnpicklingError``)."""


class GuardError(Violation):
    """tmtguard could not decide (an internal failure): in ``enforce`` that is a refusal."""


class NetworkViolation(Violation, ConnectionRefusedError):
    """A connect, send or name lookup no network rule permits. Also a ``ConnectionRefusedError``
    (``errno`` is ``ECONNREFUSED``), so network code's ``except OSError`` / ``ConnectionError``
    handling (urllib, http.client, urllib3, asyncio) treats it as a refused connection."""

    def __init__(self, message: str, decision=None):
        super().__init__(message, decision)
        self.errno = errno.ECONNREFUSED
        self.strerror = message.split("\n", 1)[0]


class ImportViolation(Violation):
    """Guarded loads or model code tried to import a module no ``imports.allow`` rule (nor the built-in
    list) names. Raised before the module's code runs. Deliberately not an ``ImportError``: code that
    treats a missing optional dependency as absent must not silently carry on past a refusal."""


class ProcessViolation(Violation):
    """A process spawn (``os.system``, ``subprocess``, ``os.exec*``, ``os.fork``...) no ``process.allow``
    rule names."""


class CodeViolation(Violation):
    """``exec``/``eval``/``compile`` of a source string, or a code object built by ``marshal`` or
    ``types.CodeType``, by a module no ``code.allow`` rule names."""


class NativeViolation(Violation):
    """A native library load or symbol lookup (ctypes, cffi) or a sub-interpreter no ``native.allow``
    rule names (an ``OSError`` too, as a failed ``dlopen`` is)."""


class FileViolation(Violation):
    """A read outside the artifact's folder, the interpreter's installation, the Hugging Face caches
    and ``files.allow``; a write outside ``files.allow``; or any read of a known secret."""


class RemoteCodeViolation(Violation):
    """Hugging Face remote code (``trust_remote_code=True``) that no ``remote_code.allow`` entry permits
    (repo, 40-hex commit, file digests), a modules-cache copy that differs from its snapshot, or a
    model repo handed classes registered from another repo's code (``remote_code.load``). Raised before
    anything from the repo runs, the imports ``check_imports`` performs included."""


class TamperViolation(Violation):
    """Guarded loads or model code tried to switch tmtguard off or loosen it (``guard.tamper``)."""


class Decision:
    __slots__ = ("mode", "verdict", "action", "target", "rule", "chain", "origin", "suggestion", "detail", "warning")

    def __init__(self, mode, verdict, action, target, rule, chain, origin, suggestion, detail=None, warning=None):
        self.mode = mode
        self.verdict = verdict
        self.action = action
        self.target = target
        self.rule = rule
        self.chain = chain
        self.origin = origin
        self.suggestion = suggestion
        self.detail = detail
        self.warning = warning

    def message(self) -> str:
        verb = "blocked" if self.verdict == "blocked" else "audited (would block)"
        lines = [f"tmtguard {verb} {self.action} {self.target!r}"]
        if self.chain:
            lines.append("  chain: " + " -> ".join(f.describe() for f in self.chain))
        else:
            lines.append("  chain: (no guarded load on this thread)")
        o = self.origin
        if o:
            dist = o.get("distribution")
            where = f"{o.get('file')}:{o.get('line')}"
            lines.append(f"  origin: {o.get('module')} ({where}" + (f", {dist['name']} {dist.get('version') or ''}".rstrip() if dist else "") + ")")
        lines.append(f"  why: {self.rule}")
        if self.suggestion:
            caution = f" ({self.warning})" if self.warning else ""
            lines.append(f"  to permit it{caution}, add to an allowlist:")
            lines.extend("      " + ln for ln in self.suggestion.splitlines())
        return "\n".join(lines)


class _State:
    mode = "off"
    policy = None
    process_wide = False  # TMTGUARD_PROCESS_WIDE: import, process, code and native rules for all code


state = _State()


def configure(mode: str, policy) -> None:
    state.policy = policy
    state.mode = mode


def refuse(action: str, target: str, rule: str, *, chain=None, suggestion: str | None = None,
           violation=Violation, detail: dict | None = None, warning: str | None = None, origin=None):
    """Record a refused action; raise ``violation`` in enforce, return the Decision in audit."""
    mode = state.mode
    if mode == "off":
        return None
    if chain is None:
        try:
            chain = provenance.chain()
        except Exception as exc:  # a decision is still made, and reported, without its chain
            chain = ()
            detail = dict(detail or {}, chain_error=repr(exc))
    # One event per (action, target) per load: a pickle naming one class 10,000 times reports it once.
    frame = chain[-1] if chain else None
    if frame is not None:
        key = (action, target)
        if frame.reported is None:
            frame.reported = {key}
        elif key in frame.reported:
            if mode == "enforce":
                raise violation(f"tmtguard blocked {action} {target!r} (already reported for {frame.describe()})")
            return None
        else:
            frame.reported.add(key)
    verdict = "blocked" if mode == "enforce" else "audited"
    if origin is None:
        try:
            origin = provenance.origin(2)
        except Exception as exc:  # the key above is already marked reported: the event must still go out
            detail = dict(detail or {}, origin_error=repr(exc))
    decision = Decision(mode, verdict, action, target, rule, tuple(chain), origin, suggestion, detail, warning)
    try:
        events.emit(decision)
    except Exception as exc:  # a sink failure is a counted drop, never a reason to let the action through
        events.count_drop("emit", exc)
    if verdict == "blocked":
        try:
            message = decision.message()
        except Exception as exc:
            message = f"tmtguard blocked {action} {target!r} (the full message failed: {exc!r})"
        raise violation(message, decision)
    return decision


def failed(action: str, target: str, exc: BaseException, violation=GuardError):
    """tmtguard itself failed while deciding: enforce refuses (fail closed); audit records and goes on."""
    return refuse(action, target, f"tmtguard could not decide: {type(exc).__name__}: {exc}",
                  violation=violation, detail={"internal_error": repr(exc)})
