"""Every ``TMTGUARD_*`` environment variable, read and validated here and nowhere else.

These names and their meanings are a public contract: operators set them in containers, and the
README documents each one from the docstrings below. Extend compatibly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

MODES = ("enforce", "audit", "off")
OTEL_EXPORTERS = ("global", "console", "otlp", "none")

TMTGUARD_MODE = "TMTGUARD_MODE"
"""``enforce`` (block what no allowlist permits), ``audit`` (never block, record everything) or
``off`` (do nothing, even on an explicit ``import tmtguard``). Unset: the start-up hook does nothing,
and ``import tmtguard`` activates in ``enforce``."""

TMTGUARD_ALLOWLIST = "TMTGUARD_ALLOWLIST"
"""One or more allowlist YAML files, separated by ``os.pathsep``, layered on the built-in ones."""

TMTGUARD_EVENTS = "TMTGUARD_EVENTS"
"""A file that receives one JSON object per line for every blocked or audited action (appended)."""

TMTGUARD_OTEL_EXPORTER = "TMTGUARD_OTEL_EXPORTER"
"""Where tmtguard's spans go: ``global`` (default: the application's global tracer provider),
``console`` (tmtguard's own provider, JSON to stderr), ``otlp`` (tmtguard's own provider, OTLP/HTTP
exporter configured by the standard ``OTEL_EXPORTER_OTLP_*`` variables) or ``none``."""

TMTGUARD_BUILTINS = "TMTGUARD_BUILTINS"
"""``1`` (default) layers the built-in allowlists under yours; ``0`` uses only your files."""

TMTGUARD_PROCESS_WIDE = "TMTGUARD_PROCESS_WIDE"
"""``1`` applies the import, process, code and native rules to all code in the process, not only
to guarded loads and model code. Default ``0``."""

DOCUMENTED = (
    TMTGUARD_MODE,
    TMTGUARD_ALLOWLIST,
    TMTGUARD_EVENTS,
    TMTGUARD_OTEL_EXPORTER,
    TMTGUARD_BUILTINS,
    TMTGUARD_PROCESS_WIDE,
)


class ConfigError(ValueError):
    """A setting tmtguard cannot use. In ``enforce`` the process refuses to start with it."""


@dataclass(frozen=True)
class Settings:
    mode: str = "enforce"
    allowlists: tuple[str, ...] = ()
    events: str | None = None
    otel_exporter: str = "global"
    builtins: bool = True
    process_wide: bool = False
    mode_from_env: bool = field(default=False, compare=False)


def _flag(env: dict, name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use 1 or 0)")


def requested_mode(env: dict | None = None) -> str | None:
    """The mode the environment asks for, or None when TMTGUARD_MODE is unset or empty."""
    env = os.environ if env is None else env
    raw = env.get(TMTGUARD_MODE)
    if raw is None or raw.strip() == "":
        return None
    mode = raw.strip().lower()
    if mode not in MODES:
        raise ConfigError(
            f"{TMTGUARD_MODE}={raw!r} is not a mode tmtguard knows; use one of: {', '.join(MODES)}"
        )
    return mode


def from_environment(env: dict | None = None, **overrides) -> Settings:
    """Read every TMTGUARD_* variable; keyword overrides (from code) win over the environment."""
    env = os.environ if env is None else env
    mode = requested_mode(env)
    allowlists = tuple(p for p in env.get(TMTGUARD_ALLOWLIST, "").split(os.pathsep) if p.strip())
    exporter = (env.get(TMTGUARD_OTEL_EXPORTER) or "global").strip().lower()
    if exporter not in OTEL_EXPORTERS:
        raise ConfigError(
            f"{TMTGUARD_OTEL_EXPORTER}={exporter!r} is not an exporter tmtguard knows; "
            f"use one of: {', '.join(OTEL_EXPORTERS)}"
        )
    values = dict(
        mode=mode or "enforce",
        mode_from_env=mode is not None,
        allowlists=allowlists,
        events=env.get(TMTGUARD_EVENTS) or None,
        otel_exporter=exporter,
        builtins=_flag(env, TMTGUARD_BUILTINS, True),
        process_wide=_flag(env, TMTGUARD_PROCESS_WIDE, False),
    )
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "allowlists":
            value = tuple(str(p) for p in ([value] if isinstance(value, (str, os.PathLike)) else value))
        if key == "events":
            value = str(value)
        if key == "mode":
            if value not in MODES:
                raise ConfigError(f"mode={value!r} is not a mode tmtguard knows; use one of: {', '.join(MODES)}")
            values["mode_from_env"] = False
        values[key] = value
    return Settings(**values)
