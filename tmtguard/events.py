"""The event record and its sinks: a JSON-lines file, logging, OpenTelemetry.

The field names are a public contract (documented in the README). A sink that fails never breaks
the application and never silently loses an event: drops are counted (``dropped()``) and reported
once through logging.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time

from . import _unpatched, provenance, telemetry

log = logging.getLogger("tmtguard")

_jsonl_fd: int | None = None
_jsonl_path: str | None = None
_extra_sinks: list = []
_dropped = 0
_drop_reported = False
_lock = threading.Lock()


def record(decision) -> dict:
    """The event as a plain dict: the JSON line, the log record's ``tmtguard`` extra, the span event."""
    rec = {
        "time": time.time(),
        "pid": os.getpid(),
        "mode": decision.mode,
        "decision": decision.verdict,
        "action": decision.action,
        "target": decision.target,
        "rule": decision.rule,
        "chain": [f.as_dict() for f in decision.chain],
        "origin": decision.origin,
    }
    if decision.detail:
        rec["detail"] = decision.detail
    if decision.suggestion:
        rec["allowlist"] = decision.suggestion
    return rec


def configure(path: str | None) -> None:
    """Open (or switch) the JSON-lines file. Raises OSError with the reason when it cannot be opened."""
    global _jsonl_fd, _jsonl_path
    if path == _jsonl_path and (_jsonl_fd is not None or path is None):
        return
    fd = None
    if path:
        # O_APPEND + one os.write per line: lines from many threads and processes never interleave.
        fd = _unpatched.os_open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    with _lock:
        old, _jsonl_fd, _jsonl_path = _jsonl_fd, fd, path
    if old is not None:
        try:
            _unpatched.os_close(old)
        except OSError:
            pass


def add_sink(fn) -> None:
    """Call ``fn(record_dict)`` for every event (tests, dashboards). Exceptions in it are counted drops."""
    if fn not in _extra_sinks:
        _extra_sinks.append(fn)


def remove_sink(fn) -> None:
    if fn in _extra_sinks:
        _extra_sinks.remove(fn)


def dropped() -> int:
    return _dropped


def emit(decision) -> dict:
    with provenance.internal():
        rec = record(decision)
        _write_jsonl(rec)
        try:
            log.warning("%s", decision.message(), extra={"tmtguard": rec})
        except Exception as exc:
            count_drop("logging", exc)
        try:
            telemetry.decision_event(decision.chain[-1] if decision.chain else None, rec)
        except Exception as exc:
            count_drop("opentelemetry", exc)
        try:
            telemetry.count_decision(rec)
        except Exception as exc:
            count_drop("opentelemetry metrics", exc)
        for sink in list(_extra_sinks):
            try:
                sink(rec)
            except Exception as exc:
                count_drop(getattr(sink, "__name__", "sink"), exc)
    return rec


def _write_jsonl(rec: dict) -> None:
    fd = _jsonl_fd
    if fd is None:
        return
    try:
        line = (json.dumps(rec, default=str, separators=(",", ":")) + "\n").encode()
        written = _unpatched.os_write(fd, line)
        if written != len(line):
            raise OSError(f"short write ({written} of {len(line)} bytes)")
    except Exception as exc:
        count_drop(f"events file {_jsonl_path}", exc)


def count_drop(sink: str, exc: BaseException) -> None:
    global _dropped, _drop_reported
    with _lock:
        _dropped += 1
        first = not _drop_reported
        _drop_reported = True
    if first:
        try:
            log.error("tmtguard could not deliver an event to %s: %s (counting drops; see tmtguard.status())", sink, exc)
        except Exception:
            pass
