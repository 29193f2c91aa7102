"""Turning the guard on and off: settings -> policy -> sinks -> interceptors, in that order, so
that a bad setting is refused before anything is patched."""
from __future__ import annotations

import logging
import threading

from . import config, decision, events, guards, provenance, telemetry
from .guards import _audit
from .policy import Policy

log = logging.getLogger("tmtguard")
_lock = threading.RLock()


class _Active:
    settings: config.Settings | None = None
    policy: Policy | None = None


active = _Active()


def activate(*, mode=None, allowlists=None, events_path=None, otel_exporter=None, builtins=None,
             process_wide=None) -> config.Settings:
    """Activate (or reconfigure) the guard. Keyword arguments override the TMTGUARD_* variables;
    ``TMTGUARD_MODE=off`` in the environment is a kill switch that code cannot override.

    Raises ConfigError (or AllowlistError, a subclass) when a setting or file cannot be used; the
    guard's previous state is then left exactly as it was."""
    if decision.state.mode != "off" and _acting():
        _tamper("tmtguard.activate")
    settings = config.from_environment(
        mode=mode, allowlists=allowlists, events=events_path, otel_exporter=otel_exporter,
        builtins=builtins, process_wide=process_wide,
    )
    env_mode = config.requested_mode()
    if env_mode == "off":
        deactivate()
        log.info("tmtguard is off (TMTGUARD_MODE=off)")
        return settings
    if settings.mode == "off":
        deactivate()
        return settings
    with _lock:
        policy = Policy.from_files(settings.allowlists, builtins=settings.builtins)
        try:
            events.configure(settings.events)
        except OSError as exc:
            raise config.ConfigError(
                f"{config.TMTGUARD_EVENTS}={settings.events!r}: cannot open the events file: {exc.strerror or exc}"
            ) from None
        telemetry.configure(settings.otel_exporter)
        decision.configure(settings.mode, policy)
        decision.state.process_wide = settings.process_wide
        active.settings, active.policy = settings, policy
        for guard in guards.modules():
            guard.install(policy)
        from .guards import tamper

        tamper.seal()
    return settings


def deactivate() -> None:
    """Remove every patch; the audit hook (which cannot be removed) becomes inert."""
    if decision.state.mode != "off" and _acting():
        _tamper("tmtguard.deactivate")
    with _lock:
        for guard in reversed(guards.modules()):
            guard.uninstall()
        decision.configure("off", active.policy)
        decision.state.process_wide = False
        active.settings = None


def _acting() -> bool:
    # A guarded load, model code on the stack, or a thread either started (a Timer calling
    # tmtguard.deactivate has no model code on its own stack).
    from .guards import tamper

    return tamper.acting() is not None


def _tamper(what: str) -> None:
    from .guards import tamper

    tamper.refuse(what, "code inside a guarded load or model code may not reconfigure tmtguard")


def status() -> dict:
    s = active.settings
    return {
        "mode": decision.state.mode,
        "allowlists": list(active.policy.files) if active.policy and s else [],
        "events": s.events if s else None,
        "otel_exporter": s.otel_exporter if s else None,
        "events_dropped": events.dropped(),
        "audit_hook": "C" if _audit.native else "Python",
    }
