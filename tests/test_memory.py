"""No memory growth across 10,000 guarded loads, blocked ones included.

After a warm-up (caches filled: the installed-distributions table, origins, tracers), 10,000 loads of
a realistic mix: plain data (the fast path), a global only the user's allowlist names (a decision, a
materialized frame, a span), a nested load an outer artifact is allowed to make, and malicious
pickles refused at the outer or the inner level (events, log records, suggestions). tracemalloc must
show no growth in what tmtguard's own code allocated and only noise overall.
"""
from __future__ import annotations

import gc
import hashlib
import logging
import os
import pickle
import tracemalloc

import pytest

import artifacts as A
import tmtguard
from conftest import write_allowlist
from tmtguard import provenance

LOADS = 10_000
TMTGUARD_DIR = os.path.dirname(os.path.abspath(tmtguard.__file__))
OWN_BOUND = 64 * 1024      # bytes still held, after 10,000 loads, by allocations made in tmtguard's code
TOTAL_BOUND = 1024 * 1024  # bytes still held overall (interpreter noise: free lists, interned strings)


class _Counting(logging.Handler):
    """Counts tmtguard's log records without keeping them (pytest's capture would keep them all)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record):
        self.format(record)
        self.count += 1


@pytest.fixture
def quiet_log():
    log = logging.getLogger("tmtguard")
    handler = _Counting()
    saved = log.propagate, log.handlers[:]
    log.propagate = False
    log.handlers[:] = [handler]
    yield handler
    log.propagate, log.handlers[:] = saved[0], saved[1]


def _workload(tmp_path, marker):
    plain = pickle.dumps({"w": [0.5] * 16, "name": "layer", "shape": (4, 4), "tags": {"a", "b"}})
    decided = A.dumps(A.call(A.glob("builtins", "len"), "abcd"))              # user allowlist: builtins:len
    bad = A.marker_pickle(str(marker))                                        # refused: posix:system
    outer = A.dumps(A.call(A.glob("pickle", "loads"), pickle.dumps([1, 2, 3])))
    nested_bad = A.dumps(A.call(A.glob("pickle", "loads"), bad))
    allow = write_allowlist(tmp_path / "a.yaml", f"""version: 1
pickle:
  allow: [builtins:len]
artifacts:
  - match: {{sha256: {hashlib.sha256(outer).hexdigest()}}}
    pickle:
      allow: [pickle:loads]
  - match: {{sha256: {hashlib.sha256(nested_bad).hexdigest()}}}
    pickle:
      allow: [pickle:loads]
""")
    bad_path = tmp_path / "bad.pkl"
    bad_path.write_bytes(bad)

    def one(i):
        k = i % 10
        if k < 5:
            assert pickle.loads(plain)["name"] == "layer"
        elif k == 5:
            assert pickle.loads(decided) == 4
        elif k == 6:
            assert pickle.loads(outer) == [1, 2, 3]
        else:
            try:
                if k == 7:
                    pickle.loads(bad)
                elif k == 8:
                    pickle.loads(nested_bad)
                else:
                    with open(bad_path, "rb") as fh:
                        pickle.load(fh)
            except tmtguard.PickleViolation:
                return 1
            raise AssertionError("a malicious load went through")
        return 0

    return allow, one


def _own(snapshot):
    return snapshot.filter_traces([tracemalloc.Filter(True, os.path.join(TMTGUARD_DIR, "*"))])


def test_no_growth_across_10000_guarded_loads(guard, tmp_path, marker, quiet_log):
    from opentelemetry import trace

    # The application's spans are the application's memory: if an earlier test installed an SDK
    # provider that keeps every span, measure without spans rather than measure that provider.
    exporter = "global" if type(trace.get_tracer_provider()).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider") \
        else "none"
    allow, one = _workload(tmp_path, marker)
    events = guard(allowlists=[allow], otel_exporter=exporter)
    tmtguard.remove_sink(events.append)  # the fixture's list would grow by design
    seen = {"n": 0}

    def count(record):
        seen["n"] += 1

    tmtguard.add_sink(count)
    try:
        for i in range(2_000):  # warm-up: every cache, every code path
            one(i)
        gc.collect()
        tracemalloc.start(1)
        try:
            before = tracemalloc.take_snapshot()
            refused = sum(one(i) for i in range(LOADS))
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
    finally:
        tmtguard.remove_sink(count)
        tmtguard.add_sink(events.append)

    assert refused == LOADS * 3 // 10 and not marker.exists()
    assert seen["n"] >= refused and quiet_log.count >= refused
    own = sum(s.size_diff for s in _own(after).compare_to(_own(before), "filename"))
    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    top = "\n".join(str(s) for s in after.compare_to(before, "lineno")[:8])
    assert own < OWN_BOUND, f"tmtguard's own allocations grew by {own} bytes over {LOADS} loads:\n{top}"
    assert total < TOTAL_BOUND, f"memory grew by {total} bytes over {LOADS} loads:\n{top}"
    assert provenance.chain() == () and not provenance._materialized, "a load frame outlived its load"
