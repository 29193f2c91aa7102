"""Proof that tests/hubfixtures.py builds offline Hugging Face fixtures transformers 5.x really loads.

Every load runs in a FRESH interpreter (sys.executable -c ...) with the env from env_for(), and its own
HF_MODULES_CACHE, so no state (sys.modules, sys.path, Auto registries, module copies) leaks between
checks. The subprocess prints one ``RESULT {json}`` line; assertions run here.

Each fresh interpreter pays ~5-8 s of torch + transformers import, so the session fixture ``jobs``
starts the interpreters of all SELECTED tests at once (2 cores) and each test waits for its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hubfixtures as hf  # noqa: E402

X = [1.0, 2.0, 3.0, 4.0]

# A third-party-looking module that the hooked repo imports at top level: transformers' check_imports
# imports it BEFORE the remote file executes.
EVILMOD = """
import os
with open(os.environ["TMT_MARKS"], "a") as f:
    f.write("evilmod imported\\n")
"""
HOOKED_EXTRA = """
import os
import tmt_fixture_evilmod
with open(os.environ["TMT_MARKS"], "a") as f:
    f.write("modeling_tiny executed\\n")
"""
HOOKED_TAIL = """
def tmt_on_forward(model, x):
    with open(os.environ["TMT_MARKS"], "a") as f:
        f.write("forward called\\n")
"""


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubfx")
    cache = root / "hub"
    pydir = root / "pylib"
    pydir.mkdir()
    (pydir / "tmt_fixture_evilmod.py").write_text(EVILMOD)
    data = {
        "root": root,
        "cache": cache,
        "pydir": pydir,
        "model": hf.tiny_custom_model(cache),
        "hooked": hf.tiny_custom_model(cache, "acme/tiny-hooked", extra_modeling_source=HOOKED_EXTRA,
                                       extra_modeling_tail=HOOKED_TAIL),
        "transitive": hf.tiny_custom_model(cache, "acme/tiny-transitive", code_repo="other/code",
                                           with_helper=True, symlinks=True, seed=1),
        "config": hf.tiny_custom_config(cache),
        "local": hf.local_custom_folder(root / "work" / "local-model", with_helper=True, seed=2),
        "bert_path": root / "bert",
    }
    (root / "marks-hub.txt").write_text("")
    return data


class Jobs:
    """Fresh interpreters, started concurrently, one per scenario; ``result(name)`` waits for one.

    ``start(..., after="other")`` starts a job from a helper thread as soon as job ``other`` has finished
    (the tiny BERT folder is built in one child, then loaded by another)."""

    def __init__(self, fx):
        self.fx = fx
        self.jobs: dict[str, dict] = {}
        self.lock = threading.Lock()

    def start(self, name, code, *, cwd=None, extra_env=None, python_args=(), hub_env=True, after=None):
        modules = self.fx["root"] / f"modules-{name}"
        env = hf.env_for(self.fx["cache"], modules) if hub_env else {}
        env.update(extra_env or {})
        job = {"modules": modules, "proc": None, "out": None, "ready": threading.Event(), "lock": threading.Lock()}
        self.jobs[name] = job

        def launch():
            if after is not None:
                self._communicate(after)
            job["proc"] = hf.start_python(code, env, cwd=cwd, python_args=python_args)
            job["ready"].set()

        if after is None:
            launch()
        else:
            threading.Thread(target=launch, daemon=True).start()

    def _communicate(self, name, timeout=240):
        job = self.jobs[name]
        job["ready"].wait(timeout)
        with job["lock"]:
            if job["out"] is None:
                proc = job["proc"]
                try:
                    out, err = proc.communicate(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                    err += f"\n[{name}: killed after {timeout} s]"
                job["out"] = (proc.returncode, out, err)
        return job["out"]

    def ensure(self, test_name):
        """Start the scenario of ``test_name`` unless the fixture already did."""
        if test_name not in self.jobs:
            SCENARIOS[test_name](self)

    def result(self, name):
        if name in SCENARIOS:
            self.ensure(name)
        rc, out, err = self._communicate(name)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert rc == 0 and lines, f"{name}: rc={rc}\nstdout:\n{out}\nstderr:\n{err}"
        return json.loads(lines[-1][len("RESULT "):]), self.jobs[name]["modules"]

    def close(self):
        for job in self.jobs.values():
            proc = job["proc"]
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None and job["out"] is None:
                proc.communicate()


@pytest.fixture(scope="session")
def jobs(fx, request):
    j = Jobs(fx)
    selected = {item.name for item in request.session.items}
    for test_name, start in SCENARIOS.items():
        if test_name in selected:
            start(j)
    yield j
    j.close()


def close(a, b, tol=1e-5):
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ pure helpers

def test_make_repo_layout_and_deterministic_commit(tmp_path):
    files = {"config.json": "{}", "sub/a.bin": b"\x00\x01"}
    c1 = hf.make_repo(tmp_path / "c1", "org/name", files)
    c2 = hf.make_repo(tmp_path / "c2", "org/name", dict(reversed(list(files.items()))))
    c3 = hf.make_repo(tmp_path / "c3", "org/name", {**files, "config.json": "{ }"})
    assert c1 == c2 != c3 and len(c1) == 40 and int(c1, 16) >= 0
    repo = tmp_path / "c1" / "models--org--name"
    assert (repo / "refs" / "main").read_text() == c1
    assert (repo / "snapshots" / c1 / "sub" / "a.bin").read_bytes() == b"\x00\x01"
    c4 = hf.make_repo(tmp_path / "c4", "org/name", files, symlinks=True)
    link = tmp_path / "c4" / "models--org--name" / "snapshots" / c4 / "config.json"
    assert link.is_symlink() and link.read_text() == "{}"
    assert hf.sanitize_module_name("tiny-model.v2") == "tiny_hyphen_model_dot_v2"
    assert hf.sanitize_module_name("7b") == "_7b"


def test_safetensors_header_is_valid():
    raw = hf.safetensors_bytes({"b": [1.0, 2.0], "a": [[0.5]]}, metadata={"format": "pt"})
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0 and list(header) == ["__metadata__", "a", "b"]
    assert header["b"] == {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}
    assert len(raw) == 8 + n + 12


# ------------------------------------------------------------------------------------------ real loads

LOAD_HUB = r"""
import json, os, sys, torch
from transformers import AutoModel
out = {}
m = AutoModel.from_pretrained("acme/tiny-model", trust_remote_code=True)
out["cls"] = type(m).__name__
out["module"] = type(m).__module__
out["config_module"] = type(m.config).__module__
out["y"] = m(torch.tensor([%(x)r]))[0].tolist()
pinned = AutoModel.from_pretrained("acme/tiny-model", revision="%(commit)s", trust_remote_code=True)
out["pinned_module"] = type(pinned).__module__
h = AutoModel.from_pretrained("acme/tiny-hooked", trust_remote_code=True)
marks_after_load = open(os.environ["TMT_MARKS"]).read().splitlines()
h(torch.tensor([%(x)r]))
out["marks_after_load"] = marks_after_load
out["marks"] = open(os.environ["TMT_MARKS"]).read().splitlines()
out["hooked_module"] = type(h).__module__
from transformers import AutoConfig
c = AutoConfig.from_pretrained("acme/tiny-config", trust_remote_code=True)
out["config_only"] = [type(c).__module__, type(c).__name__, c.hidden_size]
print("RESULT " + json.dumps(out))
"""


def start_hub(j):
    j.start("test_hub_custom_model", LOAD_HUB % {"x": X, "commit": j.fx["model"]["commit"]},
            extra_env={"TMT_MARKS": str(j.fx["root"] / "marks-hub.txt"), "PYTHONPATH": str(j.fx["pydir"])})


def test_hub_custom_model(fx, jobs):
    info, hooked = fx["model"], fx["hooked"]
    res, modules = jobs.result("test_hub_custom_model")
    assert res["cls"] == "TinyModel"
    assert res["module"] == info["module_names"]["modeling_tiny"]
    assert res["module"].startswith(f"transformers_modules.acme.tiny_hyphen_model.{info['commit']}.")
    assert res["config_module"] == info["module_names"]["configuration_tiny"]
    assert res["pinned_module"] == res["module"]
    assert close(res["y"], hf.expected_output(info["weights"], X))
    # the copies in HF_MODULES_CACHE are where the fixture says, and equal the snapshot files
    for mod, rel in info["module_relpaths"].items():
        assert (modules / rel).read_bytes() == info["code_files"][f"{mod}.py"].read_bytes()
    # extra_modeling_source / tail: check_imports imports evilmod BEFORE the remote file runs
    assert res["hooked_module"] == hooked["module_names"]["modeling_tiny"]
    assert res["marks_after_load"] == ["evilmod imported", "modeling_tiny executed"]
    assert res["marks"][-1] == "forward called"
    # config-only remote code (tiny_custom_config), torch present
    cfg = fx["config"]
    assert res["config_only"] == [cfg["module_names"]["configuration_tiny"], "TinyConfig", 4]
    assert (modules / cfg["module_relpaths"]["configuration_tiny"]).is_file()


LOAD_TRANSITIVE = r"""
import json, torch
from transformers import AutoModel
m = AutoModel.from_pretrained("acme/tiny-transitive", revision="%(commit)s", trust_remote_code=True)
print("RESULT " + json.dumps({"module": type(m).__module__, "config_module": type(m.config).__module__,
                              "helper": m.helper_marker, "y": m(torch.tensor([%(x)r]))[0].tolist()}))
"""


def start_transitive(j):
    j.start("test_transitive_code_from_other_repo", LOAD_TRANSITIVE % {"x": X, "commit": j.fx["transitive"]["commit"]})


def test_transitive_code_from_other_repo(fx, jobs):
    info = fx["transitive"]
    assert info["auto_map"]["AutoModel"] == "other/code--modeling_tiny.TinyModel"
    assert "modeling_tiny.py" not in info["snapshot_files"]
    res, modules = jobs.result("test_transitive_code_from_other_repo")
    # model revision pinned, code still read from other/code at its main ref
    assert res["module"] == f"transformers_modules.other.code.{info['code_commit']}.modeling_tiny"
    assert res["module"] == info["module_names"]["modeling_tiny"]
    assert res["config_module"] == info["module_names"]["configuration_tiny"]
    assert res["helper"] == hf.HELPER_MARKER  # relative import .helpers_tiny resolved and copied
    assert close(res["y"], hf.expected_output(info["weights"], X))
    for rel in info["module_relpaths"].values():
        assert (modules / rel).is_file()
    assert not (modules / "transformers_modules" / "acme").exists()


LOAD_LOCAL = r"""
import json, torch
from transformers import AutoModel
m = AutoModel.from_pretrained("./local-model", trust_remote_code=True)
print("RESULT " + json.dumps({"module": type(m).__module__, "config_module": type(m.config).__module__,
                              "model_config_class_module": type(m).config_class.__module__,
                              "helper": m.helper_marker, "y": m(torch.tensor([%(x)r]))[0].tolist()}))
"""


def start_local(j):
    j.start("test_local_folder_custom_code", LOAD_LOCAL % {"x": X}, cwd=j.fx["local"]["path"].parent)


def test_local_folder_custom_code(fx, jobs):
    info = fx["local"]
    res, modules = jobs.result("test_local_folder_custom_code")
    assert res["module"] == info["module_names"]["modeling_tiny"]
    assert res["module"].startswith("transformers_modules.local_hyphen_model.")
    # AutoConfig loaded configuration_tiny.py on its own (own hash folder); the model class's
    # config_class comes from the copy next to modeling_tiny.py: two distinct TinyConfig classes
    assert res["config_module"] == info["module_names"]["config:configuration_tiny"]
    assert res["model_config_class_module"] == info["module_names"]["configuration_tiny"]
    assert res["config_module"] != res["model_config_class_module"]
    assert res["helper"] == hf.HELPER_MARKER
    assert close(res["y"], hf.expected_output(info["weights"], X))
    for rel in info["module_relpaths"].values():
        assert (modules / rel).is_file(), rel


LOAD_CONFIG = r"""
import json, sys
from transformers import AutoConfig
c = AutoConfig.from_pretrained("acme/tiny-config", trust_remote_code=True)
print("RESULT " + json.dumps({"module": type(c).__module__, "cls": type(c).__name__,
                              "hidden": c.hidden_size, "torch_loaded": "torch" in sys.modules}))
"""


def start_config_notorch(j):
    site = hf.site_without(j.fx["root"] / "site-notorch")
    j.start("test_autoconfig_remote_code_without_torch", LOAD_CONFIG, python_args=("-S",),
            extra_env={"PYTHONPATH": str(site)})


def test_autoconfig_remote_code_without_torch(fx, jobs):
    # AutoConfig remote code in an interpreter where torch does not exist at all (python -S + a copy of
    # site-packages without torch); the with-torch case is checked in test_hub_custom_model
    info = fx["config"]
    res, modules = jobs.result("test_autoconfig_remote_code_without_torch")
    assert res["cls"] == "TinyConfig" and res["hidden"] == 4
    assert res["module"] == info["module_names"]["configuration_tiny"]
    assert res["torch_loaded"] is False
    assert (modules / info["module_relpaths"]["configuration_tiny"]).is_file()


LOAD_BERT = r"""
import json, sys, torch
from transformers import AutoModel, AutoTokenizer
m = AutoModel.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
enc = tok(["a b w1"], return_tensors="pt")
with torch.no_grad():
    out = m(**enc)
print("RESULT " + json.dumps({"cls": type(m).__name__, "module": type(m).__module__,
                              "shape": list(out.last_hidden_state.shape), "ids": enc["input_ids"][0].tolist(),
                              "dyn": sorted(k for k in sys.modules if k.startswith("transformers_modules"))}))
"""


BUILD_BERT = r"""
import json, sys
sys.path.insert(0, %(tests)r)
import hubfixtures
info = hubfixtures.tiny_bert_folder(%(path)r)
print("RESULT " + json.dumps({"files": info["files"], "tokenizer": info["tokenizer"]}))
"""


def start_bert_build(j):
    # tiny_bert_folder imports torch + transformers: build in a child, not in the pytest process
    j.start("bert_build", BUILD_BERT % {"tests": str(Path(__file__).resolve().parent),
                                        "path": str(j.fx["bert_path"])}, hub_env=False)


def start_bert(j):
    start_bert_build(j)
    j.start("test_tiny_bert_folder_loads", LOAD_BERT.replace("sys.argv[1]", repr(str(j.fx["bert_path"]))),
            after="bert_build")


def test_tiny_bert_folder_loads(fx, jobs):
    jobs.ensure("test_tiny_bert_folder_loads")
    built, _ = jobs.result("bert_build")
    assert {"config.json", "model.safetensors", "vocab.txt"} <= set(built["files"]) and built["tokenizer"]
    res, modules = jobs.result("test_tiny_bert_folder_loads")
    assert res["cls"] == "BertModel" and res["module"].startswith("transformers.models.bert.")
    assert res["shape"] == [1, len(res["ids"]), 32]
    assert res["ids"][0] == 2 and res["ids"][-1] == 3  # [CLS] ... [SEP]
    assert res["dyn"] == [] and not (modules / "transformers_modules").exists()


# selected test -> starter of its fresh interpreter(s); the jobs fixture starts them all at once
SCENARIOS = {
    "test_tiny_bert_folder_loads": start_bert,  # first: build, then load, in two children
    "test_hub_custom_model": start_hub,
    "test_transitive_code_from_other_repo": start_transitive,
    "test_local_folder_custom_code": start_local,
    "test_autoconfig_remote_code_without_torch": start_config_notorch,
}
