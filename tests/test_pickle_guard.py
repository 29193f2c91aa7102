"""The pickle guard on real artifacts: every payload writes a marker file when the guard is off."""
from __future__ import annotations

import io
import pickle
import sys
import threading

import pytest

import artifacts as A
import tmtguard
from conftest import write_allowlist


def loads_marker_pickle(marker):
    return pickle.loads(A.marker_pickle(str(marker)))


# --- the payloads are real -----------------------------------------------------------------------


def test_payload_runs_with_the_guard_off(unguarded, marker):
    loads_marker_pickle(marker)
    assert marker.exists(), "the malicious test pickle must really run its payload when unguarded"


def test_payload_runs_with_guard_off_for_dotted_name(unguarded, marker):
    pickle.loads(A.dumps(A.call(A.glob("pathlib", "os.system"), f"echo pwned > {marker}")))
    assert marker.exists()


# --- direct globals --------------------------------------------------------------------------------


def test_direct_global_blocked_before_payload(guard, marker):
    events = guard()
    with pytest.raises(tmtguard.PickleViolation) as info:
        loads_marker_pickle(marker)
    assert not marker.exists()
    err = info.value
    assert isinstance(err, pickle.UnpicklingError), "existing error handling must keep working"
    assert "posix:system" in str(err)
    assert "pickle.loads(<bytes:" in str(err)
    assert "- posix:system" in str(err), "the message names the allowlist line that would permit it"
    [ev] = events
    assert ev["action"] == "pickle.global" and ev["target"] == "posix:system"
    assert ev["decision"] == "blocked" and ev["mode"] == "enforce"
    assert ev["chain"][0]["loader"] == "pickle.loads"
    assert ev["chain"][0]["artifact"].startswith("<bytes:")
    assert len(ev["chain"][0]["sha256"]) == 64
    assert ev["origin"]["file"] == __file__
    for field in ("time", "pid", "rule"):
        assert ev[field]


def test_exec_payload_blocked(guard, marker):
    with pytest.raises(tmtguard.PickleViolation, match="builtins:exec"):
        pickle.loads(A.marker_pickle(str(marker), via="exec"))
    assert not marker.exists()


def test_dotted_stack_global_matches_exact_pair(guard, marker, tmp_path):
    # protocol 4 resolves ("pathlib", "os.system") to os.system: allowing pathlib:PurePosixPath must not help
    data = A.dumps(A.call(A.glob("pathlib", "os.system"), f"echo pwned > {marker}"))
    events = guard(allowlists=[write_allowlist(tmp_path / "a.yaml", "version: 1\npickle:\n  allow: [pathlib:PurePosixPath, posix:system]\n")])
    with pytest.raises(tmtguard.PickleViolation, match="pathlib:os.system"):
        pickle.loads(data)
    assert not marker.exists()
    assert events[-1]["target"] == "pathlib:os.system"


@pytest.mark.parametrize("module,name,args", [
    ("builtins", "getattr", (A.glob("builtins", "__import__"), "os")),
    ("builtins", "__import__", ("os",)),
    ("importlib", "import_module", ("os",)),
    ("operator", "attrgetter", ("system",)),
    ("pkgutil", "resolve_name", ("os:system",)),
])
def test_indirection_chains_blocked_at_first_global(guard, marker, module, name, args):
    data = A.dumps(A.call(A.glob(module, name), *args))
    with pytest.raises(tmtguard.PickleViolation, match=f"{module}:{name}"):
        pickle.loads(data)


def test_module_whose_import_is_the_payload(guard, unguarded_module, marker):
    modname, path = unguarded_module
    data = A.dumps(A.call(A.glob(modname, "anything")))
    with pytest.raises(tmtguard.PickleViolation, match=f"{modname}:anything"):
        pickle.loads(data)
    assert not marker.exists(), "the module body must not run: the decision comes before the import"
    assert modname not in sys.modules


def test_module_import_payload_runs_when_unguarded(unguarded, unguarded_module, marker):
    modname, _ = unguarded_module
    with pytest.raises(AttributeError):
        pickle.loads(A.dumps(A.call(A.glob(modname, "anything"))))
    assert marker.exists()
    sys.modules.pop(modname, None)


@pytest.fixture
def unguarded_module(tmp_path, marker, monkeypatch):
    name = f"evil_{tmp_path.name.replace('-', '_')}"
    path = tmp_path / f"{name}.py"
    path.write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, path
    sys.modules.pop(name, None)


def test_all_entry_points_are_guarded(guard, marker):
    data = A.marker_pickle(str(marker))
    import _pickle

    for fn in (pickle.loads, pickle._loads, _pickle.loads,
               lambda d: pickle.load(io.BytesIO(d)), lambda d: pickle._load(io.BytesIO(d)),
               lambda d: _pickle.load(io.BytesIO(d)),
               lambda d: pickle.Unpickler(io.BytesIO(d)).load(), lambda d: pickle._Unpickler(io.BytesIO(d)).load(),
               lambda d: _pickle.Unpickler(io.BytesIO(d)).load()):
        with pytest.raises(tmtguard.PickleViolation):
            fn(data)
    assert not marker.exists()


def test_early_bound_original_is_still_guarded(guard, marker):
    # What `from _pickle import loads` before tmtguard started holds: the audit hook still decides.
    from tmtguard import _unpatched

    events = guard()
    with pytest.raises(tmtguard.PickleViolation):
        _unpatched.c_loads(A.marker_pickle(str(marker)))
    with pytest.raises(tmtguard.PickleViolation):
        _unpatched.pickle_py_Unpickler(io.BytesIO(A.marker_pickle(str(marker)))).load()
    assert not marker.exists()
    assert events[0]["chain"][0]["loader"] == "unpickler bound before tmtguard started"


def test_subclass_find_class_without_super_is_still_checked(guard, marker):
    class Lenient(pickle.Unpickler):
        def find_class(self, module, name):  # never calls super(): no audit event
            import importlib

            return getattr(importlib.import_module(module), name)

    with pytest.raises(tmtguard.PickleViolation, match="posix:system"):
        Lenient(io.BytesIO(A.marker_pickle(str(marker)))).load()
    assert not marker.exists()


def test_benign_stdlib_pickle_loads(guard):
    import collections
    import datetime
    import decimal

    value = {"od": collections.OrderedDict(a=1), "when": datetime.datetime(2024, 1, 2),
             "d": decimal.Decimal("1.5"), "s": {1, 2}, "c": complex(1, 2)}
    events = guard()
    for protocol in (0, 2, 4, 5):
        assert pickle.loads(pickle.dumps(value, protocol=protocol)) == value
    assert events == []


# --- audit mode ------------------------------------------------------------------------------------


def test_audit_mode_records_and_lets_the_load_go_on(guard, marker):
    events = guard(mode="audit")
    loads_marker_pickle(marker)
    assert marker.exists(), "audit never blocks"
    [ev] = [e for e in events if e["action"] == "pickle.global"]
    assert ev["decision"] == "audited" and ev["mode"] == "audit" and ev["target"] == "posix:system"


def test_audit_reports_a_repeated_global_once_per_load(guard, tmp_path):
    events = guard(mode="audit")
    data = A.dumps(A.val([A.call(A.glob("builtins", "len"), "ab")] * 50))
    assert pickle.loads(data) == (2,) * 50
    assert [e["target"] for e in events] == ["builtins:len"]


# --- allowlists and scoping --------------------------------------------------------------------------


def test_allowlisted_global_is_permitted(guard, tmp_path):
    events = guard(allowlists=[write_allowlist(tmp_path / "a.yaml", "version: 1\npickle:\n  allow:\n    - builtins:len\n")])
    assert pickle.loads(A.dumps(A.call(A.glob("builtins", "len"), "abc"))) == 3
    assert events == []


def test_scoped_rule_applies_only_to_its_artifact(guard, tmp_path):
    good = tmp_path / "trusted.pkl"
    other = tmp_path / "other.pkl"
    data = A.dumps(A.call(A.glob("builtins", "len"), "abcd"))
    good.write_bytes(data)
    other.write_bytes(data)
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    # same bytes, so scope by path for one test and by digest for the other
    guard(allowlists=[write_allowlist(tmp_path / "a.yaml", f"""version: 1
artifacts:
  - match: {{path: "{good}"}}
    pickle:
      allow: [builtins:len]
""")])
    with open(good, "rb") as fh:
        assert pickle.load(fh) == 4
    with open(other, "rb") as fh, pytest.raises(tmtguard.PickleViolation):
        pickle.load(fh)
    guard(allowlists=[write_allowlist(tmp_path / "b.yaml", f"version: 1\nartifacts:\n  - match: {{sha256: {digest}}}\n    pickle:\n      allow: [builtins:len]\n")])
    assert pickle.loads(data) == 4
    with pytest.raises(tmtguard.PickleViolation):
        pickle.loads(A.dumps(A.call(A.glob("builtins", "len"), "abcde")))


# --- nested loads ------------------------------------------------------------------------------------


def test_nested_pickle_loads_names_both_artifacts(guard, tmp_path, marker):
    inner = A.marker_pickle(str(marker))
    outer = A.dumps(A.val_dict({"w": [1], "head": A.call(A.glob("pickle", "loads"), inner)}))
    path = tmp_path / "outer.pkl"
    path.write_bytes(outer)
    import hashlib

    events = guard(allowlists=[write_allowlist(tmp_path / "a.yaml", f"""version: 1
artifacts:
  - match: {{sha256: {hashlib.sha256(outer).hexdigest()}}}
    pickle:
      allow: [pickle:loads]    # the outer artifact may load a nested pickle; the nested one gets nothing
""")])
    with open(path, "rb") as fh, pytest.raises(tmtguard.PickleViolation) as info:
        pickle.load(fh)
    assert not marker.exists()
    ev = events[-1]
    assert ev["target"] == "posix:system"
    assert [f["loader"] for f in ev["chain"]] == ["pickle.load", "pickle.loads"]
    assert ev["chain"][0]["artifact"] == str(path)
    assert ev["chain"][1]["artifact"] == f"<bytes:{len(inner)}>"
    assert ev["chain"][1]["sha256"] == hashlib.sha256(inner).hexdigest()
    assert f"pickle.load({path}" in str(info.value) and "-> pickle.loads(<bytes:" in str(info.value)


def test_nested_pickle_loads_not_allowlisted_is_blocked_at_outer(guard, marker):
    outer = A.dumps(A.call(A.glob("pickle", "loads"), A.marker_pickle(str(marker))))
    events = guard()
    with pytest.raises(tmtguard.PickleViolation, match="pickle:loads"):
        pickle.loads(outer)
    assert len(events[-1]["chain"]) == 1


def test_threads_keep_their_own_chains(guard, tmp_path, marker):
    good = pickle.dumps({"a": [1, 2], "b": "x"})
    bad_paths = []
    for i in range(8):
        p = tmp_path / f"bad{i}.pkl"
        p.write_bytes(A.marker_pickle(str(marker)))
        bad_paths.append(p)
    events = guard()
    errors, results = [], []
    barrier = threading.Barrier(16)

    def load_bad(p):
        barrier.wait()
        for _ in range(20):
            try:
                with open(p, "rb") as fh:
                    pickle.load(fh)
                errors.append(f"{p} loaded")
            except tmtguard.PickleViolation as exc:
                if str(p) not in str(exc):
                    errors.append(f"{p} misattributed: {exc}")

    def load_good():
        barrier.wait()
        for _ in range(200):
            results.append(pickle.loads(good))

    threads = [threading.Thread(target=load_bad, args=(p,)) for p in bad_paths]
    threads += [threading.Thread(target=load_good) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(results) == 1600 and all(r == {"a": [1, 2], "b": "x"} for r in results)
    assert not marker.exists()
    # one event per bad load (8 files x 20 loads), each naming its own file only
    assert len(events) == 160
    assert all(len(e["chain"]) == 1 for e in events)
