"""Published pickle-scanner and loader bypasses, each a real artifact, tried against tmtguard.

For every technique in :mod:`redteam.techniques` two tests:

* with the guard off the payload really runs (the marker file appears): a test that cannot fail
  proves nothing, so each artifact is shown to be malicious;
* in enforce the load fails before the payload runs, and the event names the exact global the
  artifact spelled (``event["target"]``) and the chain of loads that reached it.
"""
from __future__ import annotations

import pickle
import time

import pytest

import tmtguard
from conftest import write_allowlist

from .techniques import TECHNIQUES, Ctx

# Libraries that bind pickle.loads when they are imported: import them while the guard is on (as an
# application started with TMTGUARD_MODE does), not first inside a test that switched it off.
try:
    import cloudpickle  # noqa: F401
except ImportError:  # pragma: no cover
    pass

IDS = [t.id for t in TECHNIQUES]


def test_the_catalogue_has_at_least_30_distinct_techniques_each_cited():
    assert len(set(IDS)) == len(IDS) >= 30
    for t in TECHNIQUES:
        assert t.cite and ("GHSA-" in t.cite or "CVE-" in t.cite or "no public advisory" in t.cite), t.id


@pytest.fixture
def ctx(tmp_path, marker, monkeypatch):
    c = Ctx(tmp_path, marker, monkeypatch)
    yield c
    for fn in reversed(c.cleanups):
        fn()


def _appears(path, within: float) -> bool:
    deadline = time.monotonic() + within
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()


@pytest.mark.parametrize("technique", TECHNIQUES, ids=IDS)
def test_payload_really_runs_with_the_guard_off(technique, ctx, unguarded):
    case = technique.build(ctx)
    try:
        case.load()
    except Exception:
        pass  # many payloads leave a broken object behind: what matters is that they ran
    assert _appears(ctx.marker, case.wait_for_marker), f"{technique.id}: the payload did not run unguarded"


@pytest.mark.parametrize("technique", TECHNIQUES, ids=IDS)
def test_blocked_in_enforce_and_named(technique, ctx, guard, tmp_path):
    case = technique.build(ctx)
    allowlists = [write_allowlist(tmp_path / "scoped.yaml", case.allowlist)] if case.allowlist else []
    events = guard(allowlists=allowlists)
    with pytest.raises(tmtguard.Violation) as info:
        case.load()
    assert not ctx.marker.exists(), f"{technique.id}: payload ran under the guard"

    blocked = [e for e in events if e["decision"] == "blocked"]
    assert blocked, f"{technique.id}: refused without an event"
    ev = blocked[0]
    assert (ev["action"], ev["target"]) == (case.action, case.target)
    assert [f["loader"] for f in ev["chain"]] == list(case.loaders), ev["chain"]
    if case.artifact:
        assert ev["chain"][0]["artifact"] == case.artifact
    assert all(f["sha256"] and len(f["sha256"]) == 64 for f in ev["chain"])
    err = info.value
    assert f"{case.target!r}" in str(err) and "chain:" in str(err)
    if case.action == "pickle.global":
        assert isinstance(err, pickle.UnpicklingError), "existing `except UnpicklingError` must keep working"
        assert f"- {case.target}" in ev["allowlist"], "the event carries the line that would permit it"
