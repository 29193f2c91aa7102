"""The two audit hooks (C, built with the wheel where a compiler is present; Python, where it is not)
make the same decisions. The whole suite runs with the C hook where it is built; this runs the guards'
own suites again with the Python hook, in a fresh interpreter (the hook is chosen once per process)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import HERE, subprocess_env

GUARD_SUITES = ["test_pickle_guard.py", "test_files.py", "test_code.py", "test_imports.py", "test_process.py",
                "test_native.py", "test_network.py", "test_tamper.py"]


def test_the_guards_suites_pass_with_the_python_audit_hook():
    if importlib.util.find_spec("tmtguard._auditfast") is None:
        pytest.skip("tmtguard was built without a C compiler here: the whole suite already ran with the Python hook")
    env = subprocess_env(TMTG_TEST_AUDIT_HOOK="python")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *GUARD_SUITES],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=1200)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
    assert proc.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail


def test_the_python_hook_is_what_that_run_uses():
    """The switch the run above relies on really selects the Python hook (a test that could not fail
    otherwise: with the C hook it would pass for the wrong reason)."""
    code = ("import sys; sys.modules['tmtguard._auditfast'] = None\n"
            "import tmtguard; from tmtguard.guards import _audit\n"
            "print(tmtguard.status()['audit_hook'], _audit._fast is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=subprocess_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split() == ["Python", "True"], out.stderr


def test_getframe_is_sys_getframe_without_its_audit_event():
    """The C frame getter the guards use in their handlers: the same frames as sys._getframe, None past
    the outermost one, and no sys._getframe event (whose arguments CPython builds for every hook)."""
    fast = pytest.importorskip("tmtguard._auditfast")
    if not hasattr(fast, "getframe"):
        pytest.skip("the Python hook is in use (TMTG_TEST_AUDIT_HOOK=python)")
    from tmtguard import provenance
    from tmtguard.guards import _audit

    assert provenance.frame_at is fast.getframe
    seen = []

    def inner():
        got = [fast.getframe(0), fast.getframe(1), fast.getframe(10**6)]
        quiet = len(seen)
        return got, [sys._getframe(0), sys._getframe(1)], quiet

    _audit.register("sys._getframe", seen.append)
    try:
        got, want, quiet = inner()
    finally:
        _audit.unregister("sys._getframe")
    assert got[:2] == want and got[2] is None
    assert quiet == 0 and len(seen) == 2  # the handler does see the real calls
    with pytest.raises(ValueError):
        fast.getframe(-1)


def test_an_event_registered_later_reaches_its_handler_past_the_prefix_filter():
    """The C hook rejects event names by their first two bytes before hashing them; an event with a
    new prefix, registered after the start, must still reach its handler, and a neighbour must not."""
    pytest.importorskip("tmtguard._auditfast")
    from tmtguard.guards import _audit

    calls = []
    _audit.register("zq.tmtguard-test", calls.append)
    try:
        sys.audit("zq.tmtguard-test", 1)
        sys.audit("zq.tmtguard-other", 2)
        sys.audit("zr.tmtguard-test", 3)
    finally:
        _audit.unregister("zq.tmtguard-test")
    sys.audit("zq.tmtguard-test", 4)
    assert calls == [(1,)]


def test_trusted_callers_are_settled_in_c_unless_they_are_model_code(tmp_path):
    """register(..., callers=): an event raised by code of a listed module does not reach the handler
    (the code guard lets compile()/exec() by typing or dataclasses through that way), but code of any
    other module does, and so does model code that names itself after a listed module."""
    pytest.importorskip("tmtguard._auditfast")
    from tmtguard import provenance
    from tmtguard.guards import _audit

    def raiser(module_name: str, filename: str):
        ns = {"__name__": module_name, "__file__": filename, "sys": sys}
        exec(compile("def fire(n):\n    sys.audit('zq.callers-test', n)\n", filename, "exec"), ns)
        return ns["fire"]

    trusted = raiser("tmt_trusted_generator", str(tmp_path / "gen.py"))
    other = raiser("tmt_other_module", str(tmp_path / "other.py"))
    posing = raiser("tmt_trusted_generator", str(tmp_path / "model.py"))
    calls = []
    _audit.register("zq.callers-test", calls.append, callers=frozenset({"tmt_trusted_generator"}))
    provenance._model_code[str(tmp_path / "model.py")] = ()
    try:
        trusted(1)
        other(2)
        posing(3)
    finally:
        _audit.unregister("zq.callers-test")
        provenance._model_code.pop(str(tmp_path / "model.py"), None)
    assert calls == [(2,), (3,)]


def test_model_code_naming_itself_typing_still_has_what_it_executes_adopted(guard, tmp_path, marker):
    """Model code that renames its module "typing" (a code generator every chain may use) is still
    model code for the C hook: the function its exec() defines is model code when it runs later,
    outside any model frame, and its write is refused."""
    import payloads as P
    import tmtguard

    src = f"def later():\n    open({str(marker)!r}, 'w').write('x')\n"
    folder = P.hub_folder(tmp_path, f"""
        globals()["__name__"] = "typing"
        ns = {{"__builtins__": __builtins__}}
        exec(compile({src!r}, "<generated>", "exec"), ns)
        self.later = ns["later"]
    """)
    guard()
    model = P.load_hub(folder)
    P.infer(model)
    with pytest.raises(tmtguard.FileViolation):
        model.later()
    assert not marker.exists()


def test_own_reads_match_the_os_functions(tmp_path):
    """read_file (tmtguard's own reads, without audit events) returns what os returns."""
    fast = pytest.importorskip("tmtguard._auditfast")
    if not hasattr(fast, "read_file"):
        pytest.skip("the Python hook is in use (TMTG_TEST_AUDIT_HOOK=python)")
    import os

    small, empty = tmp_path / "small.py", tmp_path / "empty.py"
    small.write_bytes(b"x = 1\n" * 100)
    empty.write_bytes(b"")
    (tmp_path / "sub").mkdir()
    for path in (small, empty):
        key, data = fast.read_file(str(path), 1 << 20)
        st = os.stat(path)
        assert key == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == fast.stat_key(str(path))
        assert data == path.read_bytes()
    assert fast.read_file(str(small), 100) is None  # at or over the limit: the caller reads it in blocks
    assert fast.read_file(str(tmp_path / "sub"), 1 << 20) is None  # not a regular file
    with pytest.raises(FileNotFoundError):
        fast.read_file(str(tmp_path / "missing"), 10)
