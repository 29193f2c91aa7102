"""process.spawn: guarded loads and model code may start only the programs process.allow names."""
from __future__ import annotations

import multiprocessing.util
import os
import pty
import subprocess
import sys
import threading

import pytest

import payloads as P
import tmtguard
from conftest import write_allowlist

TOUCH = """subprocess.run(["touch", {marker!r}])"""


def touch_hub(tmp_path, marker):
    return P.hub_folder(tmp_path, TOUCH.format(marker=str(marker)), net_imports="import subprocess")


# --- a forward() that spawns a process at inference --------------------------------------------------


def test_forward_spawn_runs_with_the_guard_off(unguarded, tmp_path, marker):
    P.infer(P.load_hub(touch_hub(tmp_path, marker)))
    assert marker.exists(), "the model really spawns a process at inference when unguarded"


def test_forward_spawn_at_inference_blocked_with_hub_chain_and_model_line(guard, tmp_path, marker):
    folder = touch_hub(tmp_path, marker)
    events = guard()
    model = P.load_hub(folder)  # loading is fine: the payload waits for inference
    assert events == []
    with pytest.raises(tmtguard.ProcessViolation) as info:
        P.infer(model)
    assert not marker.exists()
    [ev] = P.of(events, "process.spawn")
    assert ev["decision"] == "blocked" and ev["target"] == "touch"
    assert ev["chain"] == [{"loader": "torch.hub.load", "artifact": folder,
                            "sha256": ev["chain"][0]["sha256"]}]
    assert len(ev["chain"][0]["sha256"]) == 64, "the hub folder is pinned by the sha256 of its hubconf.py"
    file, line = P.forward_line(folder, "subprocess.run")
    assert (ev["origin"]["file"], ev["origin"]["line"], ev["origin"]["function"]) == (file, line, "forward")
    assert ev["detail"]["argv"] == ["touch", str(marker)]
    assert "torch.hub.load(" in str(info.value) and "/usr/bin/touch" in str(info.value)
    assert "model code" in ev["rule"]


def test_forward_spawn_audited_and_runs(guard, tmp_path, marker):
    folder = touch_hub(tmp_path, marker)
    events = guard(mode="audit")
    P.infer(P.load_hub(folder))
    assert marker.exists(), "audit never blocks"
    [ev] = P.of(events, "process.spawn")
    assert ev["decision"] == "audited" and ev["chain"][0]["loader"] == "torch.hub.load"


def test_forward_spawn_permitted_by_process_allow(guard, tmp_path, marker):
    folder = touch_hub(tmp_path, marker)
    events = guard(allowlists=[write_allowlist(tmp_path / "a.yaml", "version: 1\nprocess:\n  allow: [touch]\n")])
    P.infer(P.load_hub(folder))
    assert marker.exists() and events == []


def test_scoped_rule_permits_only_that_hub_folder(guard, tmp_path, marker):
    folder = touch_hub(tmp_path, marker)
    other_marker = tmp_path / "OTHER"
    other = touch_hub(tmp_path, other_marker)
    events = guard()
    with pytest.raises(tmtguard.ProcessViolation):
        P.infer(P.load_hub(folder))
    scoped = events[-1]["allowlist"].split("# or, only for this artifact:\n")[1]
    rules = write_allowlist(tmp_path / "a.yaml", "version: 1\n" + scoped + "\n")
    assert "sha256:" in scoped
    events = guard(allowlists=[rules])
    P.infer(P.load_hub(folder))
    assert marker.exists(), "the suggested scoped rule permits this artifact"
    with pytest.raises(tmtguard.ProcessViolation):
        P.infer(P.load_hub(other))
    assert not other_marker.exists(), "and no other"


def test_application_code_outside_model_code_is_untouched(guard, tmp_path, marker):
    folder = touch_hub(tmp_path, marker)
    events = guard()
    P.load_hub(folder)  # model code registered: the application's own spawns must still be its business
    subprocess.run(["touch", str(marker)], check=True)
    assert os.system("true") == 0
    assert marker.exists() and events == []


# --- every way to start a process, inside a guarded load -----------------------------------------------


def _spawners(marker):
    m = str(marker)
    return {
        "os.system": lambda: os.system(f"touch {m}"),
        "os.popen": lambda: os.popen(f"touch {m}").read(),
        "subprocess.run": lambda: subprocess.run(["touch", m]),
        "subprocess.shell": lambda: subprocess.run(f"touch {m}", shell=True),
        "subprocess.check_output": lambda: subprocess.check_output(["touch", m]),
        "os.posix_spawn": lambda: os.waitpid(os.posix_spawn("/usr/bin/touch", ["touch", m], dict(os.environ)), 0),
        "os.posix_spawnp": lambda: os.waitpid(os.posix_spawnp("touch", ["touch", m], dict(os.environ)), 0),
        "os.spawnv": lambda: os.spawnv(os.P_WAIT, "/usr/bin/touch", ["touch", m]),
        "os.spawnlp": lambda: os.spawnlp(os.P_WAIT, "touch", "touch", m),
        "pty.spawn": lambda: pty.spawn(["touch", m]),
        "os.fork": _fork_touch(m),
        "multiprocessing fork_exec": lambda: os.waitpid(multiprocessing.util.spawnv_passfds(
            b"/usr/bin/touch", [b"touch", m.encode()], ()), 0),
    }


def _fork_touch(m):
    def run():
        pid = os.fork()
        if pid == 0:
            try:
                open(m, "w").close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)

    return run


SPAWNERS = sorted(_spawners("x"))


@pytest.mark.parametrize("how", SPAWNERS)
def test_every_spawn_path_blocked_in_a_guarded_load(guard, tmp_path, marker, how):
    events = guard()
    with tmtguard.guarded_load("custom.load", str(tmp_path / "model.bin")):
        with pytest.raises(tmtguard.ProcessViolation):
            _spawners(marker)[how]()
    assert not marker.exists()
    ev = P.of(events, "process.spawn")[0]
    assert ev["chain"][0]["loader"] == "custom.load"
    assert ev["origin"]["file"] == __file__, "origin: the code that asked, not subprocess.py"


@pytest.mark.parametrize("how", SPAWNERS)
def test_every_spawn_path_really_spawns_when_unguarded(unguarded, marker, how):
    _spawners(marker)[how]()
    assert marker.exists()


def test_simple_shell_command_is_decided_on_its_program(guard, tmp_path, marker):
    events = guard(allowlists=[write_allowlist(tmp_path / "a.yaml", "version: 1\nprocess:\n  allow: ['true', touch]\n")])
    with tmtguard.guarded_load("custom.load", str(tmp_path / "model.bin")):
        assert os.system("true") == 0
        with pytest.raises(tmtguard.ProcessViolation, match="/bin/sh"):
            os.system(f"true; touch {marker}")  # a shell line that could run anything needs the shell
        with pytest.raises(tmtguard.ProcessViolation):
            subprocess.run(f"touch $(echo {marker})", shell=True)
    assert not marker.exists()
    assert [e["target"] for e in P.of(events, "process.spawn")] == ["/bin/sh"]
    assert "shell command line" in P.of(events, "process.spawn")[0]["rule"]


# --- threads ---------------------------------------------------------------------------------------


def test_threads_running_model_code_and_application_code_at_once(guard, tmp_path):
    markers = [tmp_path / f"m{i}" for i in range(8)]
    folder = P.hub_folder(tmp_path, "subprocess.run(['touch', x_marker[0]])",
                          net_imports="import subprocess\nx_marker = ['']")
    events = guard()
    model = P.load_hub(folder)
    results = {}

    def inference(i):
        sys.modules[model.__class__.__module__].x_marker[0] = str(markers[i])
        try:
            P.infer(model)
            results[i] = "ran"
        except tmtguard.ProcessViolation:
            results[i] = "blocked"

    def application(i):
        subprocess.run(["touch", str(markers[i])], check=True)
        results[i] = "ran"

    threads = [threading.Thread(target=inference if i % 2 else application, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == ("blocked" if i % 2 else "ran") for i in range(8))
    assert all(markers[i].exists() for i in range(0, 8, 2))
    # four attempts, all blocked; reported once per (action, target) for the load, not per call
    assert len(P.of(events, "process.spawn")) == 1
    assert all(e["chain"][0]["loader"] == "torch.hub.load" for e in events)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_thread_started_by_model_code_carries_its_chain(guard, tmp_path, marker):
    # the spawn runs in a new thread whose stack holds no model code at all
    folder = P.hub_folder(tmp_path, f"""
        t = threading.Thread(target=os.system, args=("touch {marker}",))
        t.start()
        t.join()
    """, net_imports="import os\nimport threading")
    events = guard()
    P.infer(P.load_hub(folder))
    assert not marker.exists()
    [ev] = P.of(events, "process.spawn")
    assert ev["chain"][0]["loader"] == "torch.hub.load"


# --- process-wide ------------------------------------------------------------------------------------


def test_process_wide_applies_the_rules_to_application_code(guard, tmp_path, marker):
    events = guard(process_wide=True)
    try:
        with pytest.raises(tmtguard.ProcessViolation, match="application code"):
            subprocess.run(["touch", str(marker)])
    finally:
        guard()
    assert not marker.exists()
    [ev] = events
    assert ev["chain"] == [] and ev["origin"]["file"] == __file__
    subprocess.run(["touch", str(marker)], check=True)  # back to the default: application code is free
    assert marker.exists()


def test_process_wide_from_the_environment(tmp_path, marker):
    from conftest import run_python, subprocess_env

    code = f"import subprocess, tmtguard\ntry:\n    subprocess.run(['touch', {str(marker)!r}])\n" \
           "except tmtguard.ProcessViolation:\n    print('BLOCKED')\n"
    proc = run_python(code, cwd=tmp_path, env=subprocess_env(TMTGUARD_MODE="enforce", TMTGUARD_PROCESS_WIDE="1"))
    assert "BLOCKED" in proc.stdout, proc.stderr
    assert not marker.exists()
    proc = run_python(code, cwd=tmp_path, env=subprocess_env(TMTGUARD_MODE="enforce"))
    assert "BLOCKED" not in proc.stdout and marker.exists(), proc.stderr


def test_pickle_spawning_a_process_at_load_time(guard, tmp_path, marker):
    # a pickle allowlist that lets subprocess:call through still does not let the pickle spawn
    import pickle

    import artifacts as A

    data = A.dumps(A.call(A.glob("subprocess", "call"), ["touch", str(marker)]))
    events = guard(allowlists=[write_allowlist(tmp_path / "p.yaml", "version: 1\npickle:\n  allow: ['subprocess:call']\n")])
    with pytest.raises(tmtguard.ProcessViolation):
        pickle.loads(data)
    assert not marker.exists()
    [ev] = P.of(events, "process.spawn")
    assert ev["chain"][0]["loader"] == "pickle.loads" and ev["chain"][0]["artifact"] == f"<bytes:{len(data)}>"
    tmtguard.deactivate()
    try:
        pickle.loads(data)
    finally:
        guard()
    assert marker.exists(), "the same pickle spawns when unguarded"
