"""code.exec, and model code that came from a pickle: functions rebuilt from marshalled code are
attributed to their load whenever they run."""
from __future__ import annotations

import os
import pickle
import subprocess

import pytest

import artifacts as A
import payloads as P
import tmtguard
from conftest import write_allowlist

SPAWN = "import subprocess\nsubprocess.run(['touch', arg])"


def rules(tmp_path, text=P.PICKLED_FUNCTION_RULES, name="fn.yaml"):
    return write_allowlist(tmp_path / name, text)


# --- a pickled function, called long after its load ---------------------------------------------------


def test_pickled_function_payload_is_real(unguarded, marker):
    fn = pickle.loads(P.pickled_function(SPAWN))
    fn(str(marker))
    assert marker.exists()


def test_pickled_function_called_later_is_model_code_of_its_load(guard, tmp_path, marker):
    data = P.pickled_function(SPAWN)
    events = guard(allowlists=[rules(tmp_path)])
    fn = pickle.loads(data)  # the allowlist lets the pickle rebuild the function: nothing runs yet
    assert events == []
    with pytest.raises(tmtguard.ProcessViolation) as info:
        fn(str(marker))  # application code calls it later: the spawn is the pickle's, not the app's
    assert not marker.exists()
    [ev] = P.of(events, "process.spawn")
    assert ev["chain"][0]["loader"] == "pickle.loads" and ev["chain"][0]["artifact"] == f"<bytes:{len(data)}>"
    assert ev["chain"][0]["sha256"]
    assert ev["origin"]["file"] == P.PICKLED_SOURCE_FILE and ev["origin"]["function"] == "payload"
    assert ev["origin"]["line"] == 3
    assert "pickle.loads(<bytes:" in str(info.value)
    subprocess.run(["touch", str(marker)], check=True)  # the application itself is still free
    assert marker.exists()


def test_pickled_function_building_code_needs_code_allow(guard, tmp_path, marker):
    data = P.pickled_function(SPAWN)
    events = guard(allowlists=[rules(tmp_path, "version: 1\npickle:\n  allow: ['marshal:loads', 'types:FunctionType']\n")])
    with pytest.raises(tmtguard.CodeViolation, match="marshal"):
        pickle.loads(data)
    [ev] = P.of(events, "code.exec")
    assert ev["target"] == "pickle" and ev["detail"]["via"] == "marshal.loads"
    assert ev["chain"][0]["loader"] == "pickle.loads"
    assert "code:" in ev["allowlist"] and "- pickle" in ev["allowlist"]


def test_pickled_function_audited(guard, tmp_path, marker):
    data = P.pickled_function(SPAWN)
    events = guard(mode="audit", allowlists=[rules(tmp_path)])
    pickle.loads(data)(str(marker))
    assert marker.exists()
    [ev] = P.of(events, "process.spawn")
    assert ev["decision"] == "audited" and ev["origin"]["file"] == P.PICKLED_SOURCE_FILE


def test_pickled_function_spawn_permitted_by_rule(guard, tmp_path, marker):
    data = P.pickled_function(SPAWN)
    events = guard(allowlists=[rules(tmp_path), rules(tmp_path, "version: 1\nprocess:\n  allow: [touch]\n", "p.yaml")])
    pickle.loads(data)(str(marker))
    assert marker.exists() and events == []


def test_nested_function_defined_inside_pickled_code_is_model_code_too(guard, tmp_path, marker):
    body = "def inner(path):\n    import os\n    os.system('touch ' + path)\nreturn inner"
    data = P.pickled_function(body)
    guard(allowlists=[rules(tmp_path)])
    inner = pickle.loads(data)(None)
    with pytest.raises(tmtguard.ProcessViolation):
        inner(str(marker))
    assert not marker.exists()


def test_cloudpickled_function_called_later(guard, tmp_path, marker):
    cloudpickle = pytest.importorskip("cloudpickle")
    ns: dict = {}
    exec(compile("def payload(path):\n    import os\n    os.system('touch ' + path)\n", "/srv/remote/fn.py", "exec"), ns)
    data = cloudpickle.dumps(ns["payload"])
    events = guard(mode="audit")
    pickle.loads(data)  # learn which globals cloudpickle needs, to allowlist them for this artifact
    needed = sorted({e["target"] for e in P.of(events, "pickle.global")})
    digest = P.of(events, "pickle.global")[0]["chain"][0]["sha256"]
    text = (f"version: 1\nartifacts:\n  - match: {{sha256: {digest}}}\n    pickle:\n      allow: {needed!r}\n"
            "    code:\n      allow: [pickle]\n")
    events = guard(allowlists=[rules(tmp_path, text, "cp.yaml")])
    fn = pickle.loads(data)
    with pytest.raises(tmtguard.ProcessViolation):
        fn(str(marker))
    assert not marker.exists()
    [ev] = P.of(events, "process.spawn")
    assert ev["chain"][0]["sha256"] == digest
    assert ev["origin"]["function"] == "payload" and ev["origin"]["line"] == 3


# --- exec / eval / compile by model code ---------------------------------------------------------------


def test_exec_of_a_string_in_model_code_blocked(guard, tmp_path, marker):
    folder = P.hub_folder(tmp_path, f"exec(\"open({str(marker)!r}, 'w').write('x')\")")
    events = guard()
    model = P.load_hub(folder)
    with pytest.raises(tmtguard.CodeViolation):
        P.infer(model)
    assert not marker.exists()
    [ev] = P.of(events, "code.exec")
    assert ev["target"].startswith("net_") and ev["detail"]["via"] == "compile"
    assert "open(" in ev["detail"]["source"]
    assert (ev["origin"]["file"], ev["origin"]["line"]) == P.forward_line(folder, "exec(")


def test_exec_in_model_code_runs_when_unguarded(unguarded, tmp_path, marker):
    folder = P.hub_folder(tmp_path, f"exec(\"open({str(marker)!r}, 'w').write('x')\")")
    P.infer(P.load_hub(folder))
    assert marker.exists()


def test_exec_in_model_code_permitted_by_code_allow(guard, tmp_path, marker):
    folder = P.hub_folder(tmp_path, f"exec(\"open({str(marker)!r}, 'w').write('x')\")", name="net_codegen_ok")
    events = guard(allowlists=[write_allowlist(tmp_path / "c.yaml", "version: 1\ncode:\n  allow: [net_codegen_ok]\n"
                                                                     f"files:\n  allow: [{str(tmp_path)!r}]\n")])
    P.infer(P.load_hub(folder))
    assert marker.exists() and events == []


@pytest.mark.parametrize("how,via", [
    (lambda: eval("1 + 1"), "compile"),
    (lambda: exec("x = 1"), "compile"),
    (lambda: compile("x = 1", "<payload>", "exec"), "compile"),
    (lambda: (lambda: 0).__code__.replace(co_name="renamed"), "types.CodeType"),
    (lambda: __import__("marshal").loads(__import__("marshal").dumps((lambda: 0).__code__)), "marshal.loads"),
])
def test_code_generation_inside_a_guarded_load(guard, tmp_path, how, via):
    events = guard()
    with tmtguard.guarded_load("custom.load", str(tmp_path / "model.bin")):
        with pytest.raises(tmtguard.CodeViolation):
            how()
    [ev] = P.of(events, "code.exec")
    assert ev["detail"]["via"] == via and ev["target"] == "test_code"
    assert ev["chain"][0]["loader"] == "custom.load"
    how()  # application code outside the load: untouched


def test_framework_code_generation_keeps_working_in_model_code(guard, tmp_path):
    # torch.fx generates and execs Python for a traced module; dataclasses and namedtuple generate
    # methods: all inside model code at inference, none refused
    folder = P.hub_folder(tmp_path, """
        traced = torch.fx.symbolic_trace(Double())
        Point = collections.namedtuple("Point", "x y")

        @dataclasses.dataclass
        class Config:
            size: int = 2

        x = traced(x) + Point(0, 0).x + Config().size - 2
    """, net_imports="import collections\nimport dataclasses\nimport torch.fx\n\n\n"
                     "class Double(torch.nn.Module):\n    def forward(self, x):\n        return x * 2\n")
    events = guard()
    out = P.infer(P.load_hub(folder))
    assert out.shape == (1, 2) and events == []


def test_application_exec_untouched(guard, tmp_path, marker):
    events = guard()
    P.load_hub(P.hub_folder(tmp_path, "pass"))  # model code exists in the process
    exec(f"open({str(marker)!r}, 'w').write('x')")
    assert marker.exists() and events == []
