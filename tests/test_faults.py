"""tmtguard under faults: an unwritable events file, a full disk, an OpenTelemetry exporter that
raises or hangs, a malformed allowlist, an exception inside tmtguard itself.

What must hold in every case: enforce fails closed with a clear message (the malicious load is still
refused, with a tmtguard Violation), audit never breaks the application, and no event is silently
lost: at worst it is a drop counted in ``tmtguard.status()["events_dropped"]`` and reported once by
an error log line.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

import artifacts as A
import tmtguard
from conftest import run_python, subprocess_env, write_allowlist
from tmtguard import events as tm_events
from tmtguard import policy as tm_policy
from tmtguard import provenance

NEEDS_A_DECISION = A.dumps(A.call(A.glob("builtins", "len"), "abc"))  # not a built-in pair: always decided


@pytest.fixture
def drops():
    """Counts drops from here on; re-arms the once-per-process drop log line."""
    tm_events._drop_reported = False
    start = tmtguard.status()["events_dropped"]
    yield lambda: tmtguard.status()["events_dropped"] - start
    tm_events._drop_reported = False


# --- the events file ------------------------------------------------------------------------------------


def test_an_events_path_that_cannot_be_opened_is_refused_and_the_guard_stays_as_it_was(guard, tmp_path, marker):
    guard()
    before = tmtguard.status()
    with pytest.raises(tmtguard.ConfigError, match="cannot open the events file"):
        tmtguard.activate(mode="enforce", events_path=str(tmp_path))  # a directory: EISDIR, even for root
    assert tmtguard.status() == before
    with pytest.raises(tmtguard.PickleViolation):
        pickle.loads(A.marker_pickle(str(marker)))
    assert not marker.exists()


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_a_full_disk_is_a_counted_reported_drop_never_a_pass(guard, drops, caplog, marker, mode):
    events = guard(mode=mode, events_path="/dev/full")  # every write: ENOSPC
    with caplog.at_level(logging.ERROR, logger="tmtguard"):
        for _ in range(3):
            if mode == "enforce":
                with pytest.raises(tmtguard.PickleViolation, match="posix:system"):
                    pickle.loads(A.marker_pickle(str(marker)))
            else:
                pickle.loads(A.marker_pickle(str(marker)))  # audit: the application goes on
    assert marker.exists() == (mode == "audit")
    # (in audit the payload goes on to spawn its shell, a second event per load)
    assert [e["target"] for e in events if e["action"] == "pickle.global"] == ["posix:system"] * 3
    assert drops() == len(events), "each event the file did not get is counted; the other sinks got them all"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "/dev/full" in errors[0] and "No space left" in errors[0]


def test_a_sink_that_raises_is_a_counted_drop_and_the_others_still_get_the_event(guard, drops, marker):
    def broken(record):
        raise RuntimeError("dashboard down")

    tmtguard.add_sink(broken)
    try:
        events = guard()  # its sink is added after the broken one
        with pytest.raises(tmtguard.PickleViolation):
            pickle.loads(A.marker_pickle(str(marker)))
    finally:
        tmtguard.remove_sink(broken)
    assert drops() == 1 and len(events) == 1 and not marker.exists()


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_startup_with_an_unusable_events_file(tmp_path, marker, mode):
    # enforce: the process refuses to start (exit 78) rather than run without its events file;
    # audit: the guard keeps auditing without the file (decisions go to the log), it does not go off.
    env = subprocess_env(TMTGUARD_MODE=mode, TMTGUARD_EVENTS=tmp_path)
    code = textwrap.dedent(f"""
        import pickle, tmtguard, artifacts as A
        pickle.loads(A.marker_pickle({str(marker)!r}))
        print("APP RAN", tmtguard.status()["mode"])
    """)
    out = run_python(code, cwd=tmp_path, env=env)
    assert "cannot open the events file" in out.stderr
    if mode == "enforce":
        assert out.returncode == 78 and "APP RAN" not in out.stdout and not marker.exists()
    else:
        assert out.returncode == 0 and "APP RAN audit" in out.stdout and marker.exists()
        assert "going on without the events file" in out.stderr
        assert "tmtguard audited (would block) pickle.global 'posix:system'" in out.stderr, "the decision reached the log"


# --- an exception inside tmtguard -----------------------------------------------------------------------


def _boom(*args, **kwargs):
    raise RuntimeError("injected tmtguard bug")


INJECTIONS = [
    (tm_policy.Policy, "pickle_allowed"),  # the policy itself
    (provenance, "chain"),                 # provenance: who is acting
    (provenance, "origin"),                # provenance: which code asked
    (tmtguard.decision.Decision, "message"),  # the refusal text
    (tm_events, "record"),                 # the event record
]


@pytest.mark.parametrize("owner,attr", INJECTIONS, ids=[f"{getattr(o, '__name__', o)}.{a}" for o, a in INJECTIONS])
def test_an_internal_error_fails_closed_in_enforce_with_a_clear_message(guard, drops, monkeypatch, owner, attr):
    events = guard()
    monkeypatch.setattr(owner, attr, _boom)
    with pytest.raises(tmtguard.PickleViolation) as info:
        pickle.loads(NEEDS_A_DECISION)
    assert str(info.value).startswith("tmtguard blocked pickle.global 'builtins:len'")
    monkeypatch.undo()
    assert len(events) + drops() >= 1, "the refusal was recorded, or its loss counted"
    for ev in events:
        assert ev["decision"] == "blocked" and ev["target"] == "builtins:len"


@pytest.mark.parametrize("owner,attr", INJECTIONS, ids=[f"{getattr(o, '__name__', o)}.{a}" for o, a in INJECTIONS])
def test_an_internal_error_never_breaks_the_application_in_audit(guard, drops, monkeypatch, owner, attr):
    events = guard(mode="audit")
    monkeypatch.setattr(owner, attr, _boom)
    assert pickle.loads(NEEDS_A_DECISION) == 3
    assert pickle.loads(pickle.dumps({"ok": [1, 2]})) == {"ok": [1, 2]}
    monkeypatch.undo()
    assert len(events) + drops() >= 1
    for ev in events:
        assert ev["decision"] == "audited" and ev["target"] == "builtins:len"


def test_a_policy_bug_refuses_even_what_the_allowlist_permits(guard, monkeypatch, tmp_path):
    # Fail closed: when tmtguard cannot decide, enforce does not guess "allowed".
    events = guard(allowlists=[write_allowlist(tmp_path / "a.yaml", "version: 1\npickle:\n  allow: [builtins:len]\n")])
    assert pickle.loads(NEEDS_A_DECISION) == 3
    monkeypatch.setattr(tm_policy.Policy, "pickle_allowed", _boom)
    with pytest.raises(tmtguard.PickleViolation, match="could not decide: RuntimeError: injected tmtguard bug"):
        pickle.loads(NEEDS_A_DECISION)
    assert events[-1]["detail"]["internal_error"] == "RuntimeError('injected tmtguard bug')"
    # built-in data types never reach the policy: the application's plain data still loads
    assert pickle.loads(pickle.dumps({"when": __import__("datetime").date(2024, 1, 2)})) is not None


# --- malformed allowlists ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "version: 1\npickle: &a {allow: [*a]}\n",  # a recursive alias: used to hang the parser
    "version: 1\nremote_code:\n  allow:\n    - repo: a/b\n      revision: " + "0" * 40
    + "\n      files:\n        [x]: sha256:" + "0" * 64 + "\n",  # used to raise TypeError
    "version: 1\npickle:\n  allow: []\npickle:\n  allow: [os:system]\n",  # a duplicate key
])
def test_malformed_allowlist_is_a_clear_error_and_the_guard_stays(guard, tmp_path, marker, text):
    guard()
    bad = write_allowlist(tmp_path / "bad.yaml", text)
    with pytest.raises(tmtguard.AllowlistError, match=str(bad)):
        tmtguard.activate(mode="enforce", allowlists=[str(bad)])
    assert tmtguard.status()["mode"] == "enforce"
    with pytest.raises(tmtguard.PickleViolation):
        pickle.loads(A.marker_pickle(str(marker)))


# --- OpenTelemetry: the application's own exporter raises or hangs --------------------------------------

OTEL_APP = """
import os, pickle, sys, time
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

FAULT, PROCESSOR, MARKER = sys.argv[1], sys.argv[2], sys.argv[3]


class FaultyExporter(SpanExporter):
    def export(self, spans):
        if FAULT == "raises":
            raise RuntimeError("collector down")
        time.sleep(3600)  # hangs

    def shutdown(self):
        pass


provider = TracerProvider()
provider.add_span_processor((SimpleSpanProcessor if PROCESSOR == "simple" else BatchSpanProcessor)(FaultyExporter()))
trace.set_tracer_provider(provider)

import artifacts as A
import tmtguard  # TMTGUARD_MODE is set: already active; spans go to the provider above
start = time.monotonic()
for i in range(3):
    try:
        pickle.loads(A.marker_pickle(MARKER))
        print("loaded", flush=True)
    except pickle.UnpicklingError as exc:
        print("refused", type(exc).__name__, flush=True)
assert pickle.loads(pickle.dumps({"benign": 1})) == {"benign": 1}
print("done", round(time.monotonic() - start, 2), tmtguard.status()["events_dropped"], flush=True)
os._exit(0)  # the SDK's own exit-time flush would wait on the hung exporter: not what is under test
"""


@pytest.mark.parametrize("processor", ["simple", "batch"])
@pytest.mark.parametrize("fault", ["raises", "hangs"])
@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_a_faulty_application_exporter_never_hangs_or_breaks_a_load(tmp_path, marker, fault, processor, mode):
    events_file = tmp_path / "events.jsonl"
    env = subprocess_env(TMTGUARD_MODE=mode, TMTGUARD_EVENTS=events_file)
    script = tmp_path / "app.py"
    script.write_text(OTEL_APP)
    out = subprocess.run([sys.executable, str(script), fault, processor, str(marker)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and lines[-1].startswith("done"), out.stderr[-3000:]
    seconds = float(lines[-1].split()[1])
    # each span waits at most telemetry.END_WAIT on a hung exporter, and only until it is known stuck
    assert seconds < 5, f"the loads took {seconds} s with an exporter that {fault}"
    if mode == "enforce":
        assert lines[:3] == ["refused PickleViolation"] * 3 and not marker.exists()
    else:
        assert lines[:3] == ["loaded"] * 3 and marker.exists()
    records = [json.loads(line) for line in events_file.read_text().splitlines()]
    verdict = "blocked" if mode == "enforce" else "audited"
    assert [(r["decision"], r["target"]) for r in records if r["action"] == "pickle.global"] == \
        [(verdict, "posix:system")] * 3, "every event reached the file"
    assert lines[-1].split()[2] == "0", "no event dropped"
