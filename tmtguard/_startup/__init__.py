"""Interpreter start-up. The installed ``tmtguard-startup.pth`` runs one cheap expression at every
start-up: with TMTGUARD_MODE unset it does nothing else (tmtguard is not even imported). With it set,
it imports tmtguard, whose import activates the guard through :func:`activate_or_exit`.

In ``enforce`` a setting tmtguard cannot use stops the process (exit status 78) rather than let it
run unguarded; in ``audit`` it is reported and the application goes on unguarded for that part."""
from __future__ import annotations

import os
import sys

EXIT_CONFIG = 78  # EX_CONFIG


def activate_or_exit(explicit_import: bool = False) -> None:
    from .. import activation, config

    try:
        activation.activate()
    except config.ConfigError as exc:
        try:
            mode = config.requested_mode() or "enforce"
        except config.ConfigError:
            mode = "enforce"  # an unknown mode: fail closed
        if mode == "audit":
            # Keep auditing with what does work. events_path="" means no events file (None would read
            # TMTGUARD_EVENTS again): the decisions still reach the log and OpenTelemetry.
            sys.stderr.write(f"tmtguard: {exc}\n")
            for overrides, what in (({"events_path": ""}, "without the events file (decisions go to the log)"),
                                    ({"allowlists": ()}, "with the built-in allowlists only"),
                                    ({"allowlists": (), "events_path": ""},
                                     "with the built-in allowlists only, without the events file (decisions go to the log)")):
                try:
                    activation.activate(**overrides)
                except config.ConfigError as again:
                    if str(again) != str(exc):
                        sys.stderr.write(f"tmtguard: {again}\n")
                    exc = again
                    continue
                sys.stderr.write(f"tmtguard: audit mode: going on {what}\n")
                return
            sys.stderr.write("tmtguard: audit mode: going on unguarded\n")
            return
        sys.stderr.write(f"tmtguard: {exc}\ntmtguard: refusing to start unguarded (mode {mode}); fix the setting or set TMTGUARD_MODE=off\n")
        sys.stderr.flush()
        os._exit(EXIT_CONFIG)
