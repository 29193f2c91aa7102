"""``tmtguard run``: a program and every Python process it starts run under the guard with no code
change. Fresh interpreters are the point here, so these tests start real subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import artifacts as A
import tmtguard
from conftest import subprocess_env
from tmtguard import cli, launch

torch = pytest.importorskip("torch")

# The application: loads each checkpoint named on its command line; knows nothing of tmtguard.
LOAD_APP = """
import os, sys, torch
for path in sys.argv[1:]:
    try:
        ckpt = torch.load(path, weights_only=False)
        print("loaded", sorted(ckpt))
    except Exception as exc:
        print("refused", os.path.basename(path), type(exc).__name__)
"""

# The same with plain pickle, for tests that need no torch (a fresh torch import costs seconds).
PICKLE_APP = """
import pickle, sys
for path in sys.argv[1:]:
    try:
        print("loaded", sorted(pickle.load(open(path, "rb"))))
    except Exception as exc:
        print("refused", type(exc).__name__)
"""


def tmtguard_run(*args, cwd, env=None, timeout=120, wait=True):
    cmd = [sys.executable, "-m", "tmtguard", "run", *map(str, args)]
    env = env if env is not None else subprocess_env()
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def write(path, text: str):
    path.write_text(textwrap.dedent(text))
    return path


def evil_checkpoint(path, marker):
    """An ordinary-looking checkpoint whose storage is a nested checkpoint whose pickle runs a command."""
    inner = A.torch_bytes({"w": torch.ones(2), "cfg": A.system_payload(str(marker))})
    torch.save({"w": torch.zeros(2), "nested": A.nested_from_bytes(inner)}, path)
    return path


def read_events(path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- the child's environment (pure; no process started) --------------------------------------------------


def test_child_environment_prepends_the_bootstrap_once_and_keeps_the_apps_path(tmp_path):
    env = launch.child_environment({"PYTHONPATH": f"/app/lib{os.pathsep}/more"}, allowlists=["a.yaml"],
                                   events="ev.jsonl")
    assert env["PYTHONPATH"].split(os.pathsep) == [launch.BOOTSTRAP, "/app/lib", "/more"]
    assert env["TMTGUARD_MODE"] == "enforce"
    assert env["TMTGUARD_ALLOWLIST"] == os.path.abspath("a.yaml")  # the child may change directory
    assert env["TMTGUARD_EVENTS"] == os.path.abspath("ev.jsonl")
    nested = launch.child_environment(env, mode="audit")  # tmtguard run -- tmtguard run -- ...
    assert nested["PYTHONPATH"].split(os.pathsep).count(launch.BOOTSTRAP) == 1
    assert nested["TMTGUARD_MODE"] == "audit"
    assert launch.child_environment({"TMTGUARD_MODE": "audit"})["TMTGUARD_MODE"] == "audit"
    assert os.path.isfile(os.path.join(launch.BOOTSTRAP, "sitecustomize.py"))


def test_enforce_refuses_to_start_with_a_broken_allowlist(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", "version: 1\npickle:\n  allow: [notaref]\n")
    assert cli.main(["run", "--allowlist", str(bad), "--", sys.executable, "-c", "print(1)"]) == launch.EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"{bad}:3" in err and "refusing to start" in err


def test_missing_command_and_unknown_command(capsys):
    assert cli.main(["run"]) == 2
    assert cli.main(["run", "--", "tmtguard-no-such-command"]) == launch.EXIT_NOT_FOUND
    assert "command not found: tmtguard-no-such-command" in capsys.readouterr().err


# --- the guard in the program -------------------------------------------------------------------------


def test_run_blocks_a_malicious_nested_checkpoint(tmp_path, marker):
    app = write(tmp_path / "app.py", LOAD_APP)
    ckpt = evil_checkpoint(tmp_path / "model.pt", marker)
    events = tmp_path / "events.jsonl"
    out = tmtguard_run("--events", events, "--", sys.executable, app, ckpt, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["refused", "model.pt", "PickleViolation"]
    assert not marker.exists()
    [ev] = read_events(events)
    assert (ev["decision"], ev["action"], ev["target"], ev["mode"]) == ("blocked", "pickle.global", "posix:system", "enforce")
    assert [f["artifact"] for f in ev["chain"]][0] == str(ckpt) and len(ev["chain"]) == 2
    assert ev["pid"] != os.getpid()
    assert "tmtguard blocked pickle.global 'posix:system'" in out.stderr  # the log record, on stderr


def test_audit_never_changes_what_the_application_does(tmp_path):
    """Same stdout, same exit status, the payload runs in both (audit records, it does not block)."""
    app = write(tmp_path / "app.py", PICKLE_APP)
    markers = [tmp_path / "PWNED-audit", tmp_path / "PWNED-off"]
    data = []
    for i, m in enumerate(markers):
        data.append(tmp_path / f"data{i}.pkl")
        data[-1].write_bytes(A.marker_pickle(str(m)))
    events = tmp_path / "events.jsonl"
    audited = tmtguard_run("--mode", "audit", "--events", events, "--", sys.executable, app, data[0],
                           cwd=tmp_path, wait=False)
    plain = subprocess.Popen([sys.executable, str(app), str(data[1])], cwd=tmp_path, env=subprocess_env(TMTGUARD_MODE="off"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (a_out, a_err), (p_out, p_err) = audited.communicate(timeout=120), plain.communicate(timeout=120)
    assert audited.returncode == plain.returncode == 0, a_err + p_err
    assert a_out == p_out == "loaded ['config', 'weights']\n"
    assert all(m.exists() for m in markers)  # the artifact really is malicious
    [ev] = [e for e in read_events(events) if e["action"] == "pickle.global"]
    assert (ev["decision"], ev["target"], ev["chain"][0]["loader"]) == ("audited", "posix:system", "pickle.load")
    assert "audited (would block) pickle.global 'posix:system'" in a_err and p_err == ""


def test_a_failure_inside_tmtguard_in_audit_leaves_the_application_alone(tmp_path, marker):
    app = write(tmp_path / "app.py", PICKLE_APP)
    data = tmp_path / "data.pkl"
    data.write_bytes(A.marker_pickle(str(marker)))
    unusable = tmp_path / "a-directory"
    unusable.mkdir()
    out = tmtguard_run("--mode", "audit", "--events", unusable, "--", sys.executable, app, data, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == "loaded ['config', 'weights']\n"
    assert "cannot open the events file" in out.stderr and "audit mode" in out.stderr
    assert marker.exists()
    marker.unlink()
    # The same failure in enforce: the program never starts rather than run unguarded.
    out = tmtguard_run("--events", unusable, "--", sys.executable, app, data, cwd=tmp_path)
    assert out.returncode == launch.EXIT_CONFIG and out.stdout == ""
    assert "refusing to start" in out.stderr and not marker.exists()


# --- sitecustomize: the application's own still runs; the guard starts even without the .pth ---------------


def test_the_applications_own_sitecustomize_still_runs(tmp_path, marker):
    site_dir = tmp_path / "appsite"
    site_dir.mkdir()
    seen = tmp_path / "sitecustomize-ran"
    write(site_dir / "sitecustomize.py", f"""
        import sys
        # tmtguard is active before any application code, this module included.
        t = sys.modules.get("tmtguard")
        open({str(seen)!r}, "w").write(t.status()["mode"] if t else "unguarded")
        APP_SETTING = 42
    """)
    data = tmp_path / "data.pkl"
    data.write_bytes(A.marker_pickle(str(marker)))
    app = write(tmp_path / "app.py", """
        import pickle, sys, sitecustomize
        print(sitecustomize.APP_SETTING, sitecustomize.__file__)
        try:
            pickle.load(open(sys.argv[1], "rb"))
        except pickle.UnpicklingError as exc:
            print("refused", type(exc).__name__)
    """)
    env = subprocess_env()
    env["PYTHONPATH"] = f"{site_dir}{os.pathsep}{env['PYTHONPATH']}"
    out = tmtguard_run("--", sys.executable, app, data, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"42 {site_dir / 'sitecustomize.py'}", "refused PickleViolation"]
    assert seen.read_text() == "enforce" and not marker.exists()


def test_an_error_in_the_applications_sitecustomize_is_reported_as_python_does(tmp_path):
    site_dir = tmp_path / "appsite"
    site_dir.mkdir()
    write(site_dir / "sitecustomize.py", "raise RuntimeError('broken site setup')\n")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{site_dir}{os.pathsep}{env['PYTHONPATH']}"
    code = ["-c", "import sys; print('app ran', sys.modules['tmtguard'].status()['mode'])"]
    out = tmtguard_run("--", sys.executable, *code, cwd=tmp_path, env=env)
    assert out.returncode == 0 and out.stdout == "app ran enforce\n"
    assert "Error in sitecustomize" in out.stderr and "broken site setup" in out.stderr


def test_sitecustomize_starts_the_guard_where_the_startup_pth_is_not_processed(tmp_path, marker):
    """A virtualenv that sees tmtguard only through PYTHONPATH: site-packages .pth files on PYTHONPATH are
    never processed, so TMTGUARD_MODE alone does nothing there; ``tmtguard run`` still guards it."""
    import wrapt
    import yaml
    from opentelemetry import trace as otel_trace

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    roots = [os.path.dirname(os.path.dirname(m.__file__)) for m in (tmtguard, wrapt, yaml)]
    roots.append(os.path.dirname(os.path.dirname(os.path.dirname(otel_trace.__file__))))
    env = subprocess_env(TMTGUARD_MODE="enforce")
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots))
    data = tmp_path / "data.pkl"
    data.write_bytes(A.marker_pickle(str(marker)))
    app = write(tmp_path / "app.py", PICKLE_APP.replace("import pickle, sys",
                                                          "import pickle, sys; print('guard' if 'tmtguard' in sys.modules else 'none')"))
    # The environment variable alone: no start-up hook in this interpreter, the payload runs.
    out = subprocess.run([python, str(app), str(data)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == ["none", "loaded ['config', 'weights']"], out.stderr
    assert marker.exists()
    marker.unlink()
    out = tmtguard_run("--", python, app, data, cwd=tmp_path, env=env)
    assert out.stdout.splitlines() == ["guard", "refused PickleViolation"], out.stderr
    assert not marker.exists()


# --- child Python processes inherit the guard --------------------------------------------------------------


CHILDREN_APP = """
import json, multiprocessing, pickle, subprocess, sys

EVIL = sys.argv[1]


def mode():
    t = sys.modules.get("tmtguard")
    return t.status()["mode"] if t else "unguarded"


def try_evil():
    try:
        pickle.load(open(EVIL, "rb"))
        return "LOADED"
    except pickle.UnpicklingError as exc:
        return type(exc).__name__


def spawned(queue):
    queue.put({"mode": mode(), "evil": try_evil()})


def main():
    import torch

    class Squares(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.full((3,), float(i * i)), mode()

    out = {"parent": mode()}
    batches = list(torch.utils.data.DataLoader(Squares(), batch_size=4, num_workers=2))
    out["dataloader_sum"] = float(sum(b[0].sum() for b in batches))
    out["worker_modes"] = sorted({m for b in batches for m in b[1]})
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=spawned, args=(queue,))
    child.start()
    out["spawned"] = queue.get(timeout=60)
    child.join(60)
    code = "import sys; sys.path.insert(0, sys.argv[2]); import app; print(app.mode(), app.try_evil())"
    sub = subprocess.run([sys.executable, "-c", code, EVIL, sys.path[0]], capture_output=True, text=True)
    out["subprocess"] = sub.stdout.split()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
"""


def test_dataloader_workers_spawned_children_and_python_subprocesses_inherit_the_guard(tmp_path, marker):
    app = write(tmp_path / "app.py", CHILDREN_APP)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(A.marker_pickle(str(marker)))
    events = tmp_path / "events.jsonl"
    out = tmtguard_run("--events", events, "--", sys.executable, app, evil, cwd=tmp_path, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["parent"] == "enforce"
    assert result["dataloader_sum"] == 3 * sum(i * i for i in range(8))  # the good data loads
    assert result["worker_modes"] == ["enforce"]
    assert result["spawned"] == {"mode": "enforce", "evil": "PickleViolation"}
    assert result["subprocess"] == ["enforce", "PickleViolation"]
    assert not marker.exists()
    blocked = [e for e in read_events(events) if e["action"] == "pickle.global"]
    assert len(blocked) == 2 and {e["target"] for e in blocked} == {"posix:system"}
    assert len({e["pid"] for e in blocked}) == 2  # the spawned child and the subprocess, each on its own
