"""Turning it on with no code change: the start-up hook, in fresh interpreters (the point of these tests)."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

import artifacts as A
from conftest import run_python, subprocess_env

LOAD_EVIL = """
import pickle, sys
data = open(sys.argv[1] if len(sys.argv) > 1 else {path!r}, 'rb').read()
try:
    pickle.loads(data)
    print('LOADED')
except Exception as exc:
    print('REFUSED', type(exc).__name__, isinstance(exc, pickle.UnpicklingError))
"""


@pytest.fixture
def evil(tmp_path, marker):
    path = tmp_path / "evil.pkl"
    path.write_bytes(A.marker_pickle(str(marker)))
    return path


def test_unset_mode_does_nothing_not_even_import(tmp_path):
    out = run_python("import sys, pickle; print('tmtguard' in sys.modules, pickle.loads.__module__)", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "_pickle"]


def test_unset_mode_lets_the_payload_run(tmp_path, evil, marker):
    out = run_python(LOAD_EVIL.format(path=str(evil)), cwd=tmp_path)
    assert "LOADED" in out.stdout and marker.exists()


def test_enforce_from_the_environment_blocks_before_any_app_code(tmp_path, evil, marker):
    events = tmp_path / "events.jsonl"
    env = subprocess_env(TMTGUARD_MODE="enforce", TMTGUARD_EVENTS=events)
    out = run_python(LOAD_EVIL.format(path=str(evil)), cwd=tmp_path, env=env)
    assert out.stdout.split() == ["REFUSED", "PickleViolation", "True"], out.stderr
    assert not marker.exists()
    [line] = events.read_text().splitlines()
    ev = json.loads(line)
    assert ev["decision"] == "blocked" and ev["action"] == "pickle.global" and ev["target"] == "posix:system"
    assert ev["chain"][0]["loader"] == "pickle.loads" and ev["pid"] > 0


def test_audit_from_the_environment_records_and_goes_on(tmp_path, evil, marker):
    events = tmp_path / "events.jsonl"
    out = run_python(LOAD_EVIL.format(path=str(evil)), cwd=tmp_path,
                     env=subprocess_env(TMTGUARD_MODE="audit", TMTGUARD_EVENTS=events))
    assert "LOADED" in out.stdout and marker.exists()
    records = [json.loads(line) for line in events.read_text().splitlines()]
    assert {r["decision"] for r in records} == {"audited"}
    assert records[0]["action"] == "pickle.global" and records[0]["target"] == "posix:system"


def test_off_disables_even_an_explicit_import(tmp_path, evil, marker):
    code = "import tmtguard; print(tmtguard.status()['mode'])\n" + LOAD_EVIL.format(path=str(evil))
    out = run_python(code, cwd=tmp_path, env=subprocess_env(TMTGUARD_MODE="off"))
    assert out.stdout.split()[:2] == ["off", "LOADED"], out.stderr
    assert marker.exists()


def test_explicit_import_activates_enforce(tmp_path, evil, marker):
    code = "import tmtguard\n" + LOAD_EVIL.format(path=str(evil))
    out = run_python(code, cwd=tmp_path)
    assert "REFUSED" in out.stdout and not marker.exists()


@pytest.mark.parametrize("env,expect", [
    ({"TMTGUARD_MODE": "enforcing"}, "TMTGUARD_MODE='enforcing' is not a mode tmtguard knows"),
    ({"TMTGUARD_MODE": "enforce", "TMTGUARD_ALLOWLIST": "{tmp}/missing.yaml"}, "missing.yaml: cannot read allowlist"),
    ({"TMTGUARD_MODE": "enforce", "TMTGUARD_ALLOWLIST": "{tmp}/bad.yaml"}, "bad.yaml:2: unknown key 'pickels'"),
    ({"TMTGUARD_MODE": "enforce", "TMTGUARD_EVENTS": "{tmp}/no/such/dir/e.jsonl"}, "cannot open the events file"),
    ({"TMTGUARD_MODE": "enforce", "TMTGUARD_OTEL_EXPORTER": "zipkin"}, "TMTGUARD_OTEL_EXPORTER='zipkin'"),
])
def test_enforce_refuses_to_start_on_bad_settings(tmp_path, env, expect):
    (tmp_path / "bad.yaml").write_text("version: 1\npickels:\n  allow: []\n")
    env = subprocess_env(**{k: v.format(tmp=tmp_path) for k, v in env.items()})
    out = run_python("print('APP RAN')", cwd=tmp_path, env=env)
    assert out.returncode == 78
    assert "APP RAN" not in out.stdout, "the application must not run unguarded"
    assert expect in out.stderr and "refusing to start unguarded" in out.stderr


def test_audit_reports_a_bad_allowlist_and_goes_on(tmp_path, evil):
    (tmp_path / "bad.yaml").write_text("version: 1\npickels:\n  allow: []\n")
    env = subprocess_env(TMTGUARD_MODE="audit", TMTGUARD_ALLOWLIST=tmp_path / "bad.yaml")
    out = run_python("import tmtguard; print('APP RAN', tmtguard.status()['mode'])", cwd=tmp_path, env=env)
    assert out.returncode == 0 and "APP RAN audit" in out.stdout
    assert "bad.yaml:2: unknown key 'pickels'" in out.stderr


def test_references_bound_before_the_guard_started(tmp_path, marker):
    joblib = pytest.importorskip("joblib")
    bad = tmp_path / "bad.joblib"
    joblib.dump({"cfg": A.system_payload(str(marker))}, bad)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(A.marker_pickle(str(marker)))
    code = f"""
from _pickle import loads as early_loads     # bound before tmtguard starts
import joblib                                 # binds pickle._Unpickler at import
import tmtguard
for name, fn in (("early", lambda: early_loads(open({str(evil)!r}, 'rb').read())), ("joblib", lambda: joblib.load({str(bad)!r}))):
    try:
        fn(); print(name, 'LOADED')
    except tmtguard.PickleViolation as exc:
        print(name, 'REFUSED')
"""
    out = run_python(code, cwd=tmp_path)
    assert out.stdout.split() == ["early", "REFUSED", "joblib", "REFUSED"], out.stderr
    assert not marker.exists()


def test_events_file_is_safe_with_many_processes_and_threads(tmp_path):
    events = tmp_path / "events.jsonl"
    code = """
import pickle, threading, artifacts as A
data = A.dumps(A.call(A.glob('builtins', 'len'), 'x' * 3000))   # a long line: atomic appends matter
def work():
    for _ in range(50):
        pickle.loads(data)
ts = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
"""
    env = subprocess_env(TMTGUARD_MODE="audit", TMTGUARD_EVENTS=events)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env) for _ in range(4)]
    assert all(p.wait(120) == 0 for p in procs)
    lines = events.read_bytes().splitlines()
    assert len(lines) == 4 * 4 * 50
    assert all(json.loads(line)["target"] == "builtins:len" for line in lines)


@pytest.mark.parametrize("hook", ["C", "Python"])
def test_both_audit_hooks_make_the_same_decisions(tmp_path, marker, hook):
    """The C hook (wheels built with a compiler) and the Python one (built without) refuse the same payload,
    through the patched entry point and through a reference bound before tmtguard started."""
    if hook == "C" and importlib.util.find_spec("tmtguard._auditfast") is None:
        pytest.skip("tmtguard was built without a C compiler here")
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(A.marker_pickle(str(marker)))
    code = f"""
import sys
if {hook!r} == "Python":
    sys.modules["tmtguard._auditfast"] = None   # as if the wheel had been built without a compiler
from _pickle import loads as early_loads
import collections, datetime, pickle
import tmtguard
print(tmtguard.status()["audit_hook"])
good = collections.OrderedDict(when=datetime.datetime(2024, 1, 1), n=[1, 2.0, "x"])
print(pickle.loads(pickle.dumps(good)) == good)
data = open({str(evil)!r}, "rb").read()
for fn in (pickle.loads, early_loads):
    try:
        fn(data); print("LOADED")
    except tmtguard.PickleViolation:
        print("REFUSED")
# tampering that got past the checks is put back before the next decision, with either hook
from tmtguard.guards import tamper, _audit
guarded = pickle.loads
vars(pickle)["loads"] = sys.modules["tmtguard._unpatched"].pickle_loads
_audit.unregister("pickle.find_class")
tamper.verify()
print(pickle.loads is guarded, _audit.current("pickle.find_class") is not None)
try:
    early_loads(data); print("LOADED")
except tmtguard.PickleViolation:
    print("REFUSED")
"""
    out = run_python(code, cwd=tmp_path)
    assert out.stdout.split() == [hook, "True", "REFUSED", "REFUSED", "True", "True", "REFUSED"], out.stderr
    assert not marker.exists()


def test_plain_pip_install_of_the_wheel_carries_the_hook(tmp_path_factory):
    """A user's `pip install tmtguard` (no editable mode): the .pth and the allowlists land where they must."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tmp_path_factory.mktemp("wheel")
    if not os.path.exists(os.path.join(root, "pyproject.toml")):
        pytest.skip("needs the source tree")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), root],
                           capture_output=True, text=True)
    if build.returncode != 0 and "hatchling" in build.stderr:
        build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(work / "dist"), root],
                               capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = list((work / "dist").glob("tmtguard-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "tmtguard-startup.pth" in names
    assert "tmtguard/allowlists/torch.yaml" in names
    import sysconfig

    compiler = shlex.split(sysconfig.get_config_var("CC") or "none")[0]
    with_c = shutil.which(compiler) is not None
    if with_c:  # this machine can build the C audit hook: the wheel must carry it
        assert any(n.startswith("tmtguard/_auditfast") and n.endswith(".so") for n in names), names
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    # After the install (pip would otherwise find the host's tmtguard already there): tmtguard's
    # dependencies (wrapt, pyyaml, opentelemetry) come from this interpreter's site-packages, added as
    # a plain path entry: its .pth files (and a tmtguard installed there) stay out, so what runs is
    # exactly what the wheel installed into the venv.
    site_dir = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site_dir, "_host_dependencies.pth"), "w") as fh:
        fh.write(sysconfig.get_paths()["purelib"] + "\n")
    probe = ("import sys, pickle, tmtguard; print(tmtguard.__file__); print(tmtguard.status()['mode']); "
             "print(tmtguard.status()['allowlists'][0]); print(tmtguard.status()['audit_hook'])")
    env = subprocess_env(TMTGUARD_MODE="audit")
    env.pop("PYTHONPATH")
    out = subprocess.run([py, "-c", probe], cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    file, mode, allowlist, hook = out.stdout.split()
    assert file.startswith(str(venv)) and mode == "audit" and allowlist.startswith(str(venv))
    assert hook == ("C" if with_c else "Python")
    # the hook itself, without any import in the program
    evil = work / "evil.pkl"
    evil.write_bytes(A.marker_pickle(str(work / "PWNED")))
    out = subprocess.run([py, "-c", LOAD_EVIL.format(path=str(evil))], cwd=work,
                         env={**env, "TMTGUARD_MODE": "enforce"}, capture_output=True, text=True)
    assert "REFUSED PickleViolation" in out.stdout, out.stderr
    assert not (work / "PWNED").exists()
