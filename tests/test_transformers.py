"""The transformers remote-code guard, on real remote code from an offline hub cache (tests/hubfixtures.py).

Every load runs in a FRESH interpreter (transformers reads its cache locations at import, and remote code
leaves state in sys.modules, sys.path and the Auto registries). The ``jobs`` fixture starts the
interpreters of all selected tests at once; each test waits for its own. Payloads append a line to a
marks file (``TMT_MARKS``): a test asserts the line is absent under the guard, and the ``unguarded``
job shows each attack does run without it.

The scripts import the framework (torch, ``transformers.PreTrainedModel``) before loading, as a server
does at start-up: the first ``from transformers import PreTrainedModel`` inside remote code would
otherwise pull transformers' modeling stack in under the model code's chain, which the code guard
polices.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hubfixtures as hf  # noqa: E402

import tmtguard  # noqa: E402
from tmtguard import pin as pinning  # noqa: E402
from tmtguard import remote_code  # noqa: E402
from tmtguard.guards import transformers as hfguard  # noqa: E402
from tmtguard.policy import parse  # noqa: E402

X = [1.0, 2.0, 3.0, 4.0]


def mark(label: str) -> str:
    """Module-level payload: append ``label`` to the marks file."""
    return (f"import os as _tmt_os\n"
            f"with open(_tmt_os.environ['TMT_MARKS'], 'a') as _tmt_f:\n"
            f"    _tmt_f.write({label!r} + '\\n')\n")


EVILMOD = mark("evilmod imported")

TAIL_CONNECT = """
def tmt_on_forward(model, x):
    import os, socket
    port = os.environ.get("TMT_CONNECT_PORT")
    if port:
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", int(port)))
        finally:
            s.close()
"""


def write_allowlist(path: Path, entries) -> Path:
    path.write_text(remote_code.allowlist_text(entries))
    return path


def digest(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def code_files(info) -> dict:
    return {name: Path(p).read_text() for name, p in info["code_files"].items()}


def config_json(model_type: str, auto_map: dict | None) -> str:
    cfg = {"model_type": model_type, "hidden_size": hf.HIDDEN_SIZE, "out_size": hf.OUT_SIZE, "dtype": "float32",
           "architectures": ["TinyModel"]}
    if auto_map:
        cfg["auto_map"] = auto_map
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def tamper_copy(modules: Path, info: dict, module: str = "configuration_tiny") -> Path:
    """Plant a modified copy where get_cached_module_file will find it (and never refresh it)."""
    copy = modules / hf.hub_module_relpath(info["code_repo"], info["code_commit"], module)
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(info["code_files"][f"{module}.py"].read_text() + "\n" + mark("tampered copy ran"))
    return copy


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfguard")
    cache = root / "hub"
    pydir = root / "pylib"
    pydir.mkdir()
    (pydir / "tmt_fixture_evilmod.py").write_text(EVILMOD)
    work = root / "work"
    d = {"root": root, "cache": cache, "pydir": pydir}

    # a transitive model whose code repo is not allowed; payloads in every module body
    d["evil"] = hf.tiny_custom_model(cache, "acme/evil-transitive", code_repo="evil/code", with_helper=True,
                                     extra_configuration_source=mark("configuration ran"),
                                     extra_modeling_source=mark("modeling ran"),
                                     extra_helpers_source=mark("helpers ran"), model_type="tmt-evil")
    # allowed configuration + modeling, but not the helper they import relatively
    d["rel"] = hf.tiny_custom_model(cache, "acme/rel-import", code_repo="evil/rel-code", with_helper=True,
                                    extra_modeling_source=mark("rel modeling ran"),
                                    extra_helpers_source=mark("rel helpers ran"), model_type="tmt-rel")
    d["rel_allow"] = [("evil/rel-code", d["rel"]["code_commit"],
                       {n: digest(d["rel"]["code_files"][n]) for n in ("configuration_tiny.py", "modeling_tiny.py")})]
    # pinned, then the snapshot file changed in place (same commit, other bytes)
    d["digest"] = hf.tiny_custom_model(cache, "acme/digest", code_repo="other/digest-code", model_type="tmt-digest")
    d["digest_allow"] = pinning.pin("acme/digest", cache_dir=str(cache))
    modeling = d["digest"]["code_files"]["modeling_tiny.py"]
    modeling.write_text(modeling.read_text() + "\n" + mark("changed snapshot ran"))
    # pinned and benign; a modified copy is planted in the modules cache
    d["tamper"] = hf.tiny_custom_model(cache, "acme/tampered", code_repo="other/tamper-code", model_type="tmt-tamper")
    d["tamper_allow"] = pinning.pin("acme/tampered", cache_dir=str(cache))
    # modeling code importing a sibling module with `from . import x`, which transformers does not copy:
    # the snapshot has it, the modules cache has it only if something put it there
    d["sibling"] = hf.tiny_custom_model(cache, "acme/sibling", model_type="tmt-sibling",
                                        extra_modeling_source="from . import sibling_tiny\n",
                                        extra_files={"sibling_tiny.py": "SIBLING = 'from the snapshot'\n"})
    d["sibling_allow"] = [("acme/sibling", d["sibling"]["commit"],
                           {n: digest(d["sibling"]["snapshot_files"][n])
                            for n in ("configuration_tiny.py", "modeling_tiny.py", "sibling_tiny.py")})]
    # remote code importing a module whose body is the payload (check_imports imports it first)
    d["importer"] = hf.tiny_custom_model(cache, "acme/importer", model_type="tmt-importer",
                                         extra_modeling_source="import tmt_fixture_evilmod\n" + mark("importer modeling ran"))
    d["importer_allow"] = [("acme/importer", d["importer"]["commit"],
                            {"configuration_tiny.py": digest(d["importer"]["code_files"]["configuration_tiny.py"])})]
    # allowed through `tmtguard pin`; its forward() connects out when asked to
    d["allowed"] = hf.tiny_custom_model(cache, "acme/tiny-allowed", code_repo="other/code-ok", with_helper=True,
                                        extra_modeling_tail=TAIL_CONNECT, model_type="tmt-allowed", seed=3,
                                        symlinks=True)  # blobs + symlinks, as huggingface_hub stores them
    # pinned, then the code repo's main moved to a new commit
    d["moved"] = hf.tiny_custom_model(cache, "acme/moved", code_repo="other/moved-code", model_type="tmt-moved")
    d["moved_allow"] = pinning.pin("acme/moved", cache_dir=str(cache))
    files = code_files(d["moved"])
    files["modeling_tiny.py"] += "\n" + mark("moved main ran")
    d["moved_new_commit"] = hf.make_repo(cache, "other/moved-code", files)
    # re-registration: a trusted model, then repos of the same model type
    d["trusted"] = hf.tiny_custom_model(cache, "acme/trusted", code_repo="other/trusted-code", model_type="tmt-shared")
    d["trusted_allow"] = pinning.pin("acme/trusted", cache_dir=str(cache))
    evil_code = {"configuration_tiny.py": hf.configuration_source("tmt-shared", mark("rr configuration ran")),
                 "modeling_tiny.py": hf.modeling_source(mark("rr modeling ran"))}
    d["rr_code_commit"] = hf.make_repo(cache, "evil/rr-code", evil_code)
    weights = hf.safetensors_bytes(hf.tiny_weights(7), metadata={"format": "pt"})
    d["mixed_commit"] = hf.make_repo(cache, "evil/mixed", {
        "config.json": config_json("tmt-shared", {"AutoConfig": "other/trusted-code--configuration_tiny.TinyConfig",
                                                  "AutoModel": "evil/rr-code--modeling_tiny.TinyModel"}),
        "model.safetensors": weights})
    d["own_config_commit"] = hf.make_repo(cache, "evil/own-config", {
        "config.json": config_json("tmt-shared", {"AutoConfig": "evil/rr-code--configuration_tiny.TinyConfig",
                                                  "AutoModel": "evil/rr-code--modeling_tiny.TinyModel"}),
        "model.safetensors": weights})
    d["plain_commit"] = hf.make_repo(cache, "evil/plain", {"config.json": config_json("tmt-shared", None),
                                                           "model.safetensors": weights})
    # local folders
    d["local_evil"] = hf.local_custom_folder(work / "local-evil", mark("local modeling ran"),
                                             extra_configuration_source=mark("local configuration ran"))
    d["local_ok"] = hf.local_custom_folder(work / "local-ok", with_helper=True, model_type="tmt-local-ok", seed=4)
    d["local_changed"] = hf.local_custom_folder(work / "local-changed", model_type="tmt-local-changed")
    d["local_allow"] = (pinning.pin(str(work / "local-ok")) + pinning.pin(str(work / "local-changed")))
    changed = d["local_changed"]["files"]["modeling_tiny.py"]
    changed.write_text(changed.read_text() + "\n" + mark("changed local ran"))
    # config-only remote code
    d["config_ok"] = hf.tiny_custom_config(cache, "acme/tiny-config-ok", model_type="tmt-cfg-ok")
    d["config_evil"] = hf.tiny_custom_config(cache, "acme/tiny-config-evil", code_repo="evil/config-code",
                                             extra_configuration_source=mark("config code ran"), model_type="tmt-cfg-evil")
    d["config_allow"] = pinning.pin("acme/tiny-config-ok", cache_dir=str(cache))
    # custom_generate/generate.py (model.generate(custom_generate=...)), with a relative import
    d["gen_commit"] = hf.make_repo(cache, "acme/custom-generate", {
        "config.json": "{}",
        "custom_generate/generate.py": mark("custom generate ran") + "from .helper import VALUE\n"
                                       "def generate(model, *args, **kwargs):\n    return VALUE\n",
        "custom_generate/helper.py": "VALUE = 'generated'\n"})
    return d


# --------------------------------------------------------------------------------------- fresh interpreters

PRELUDE = r"""
import json, os, sys
out = {}

def attempt(key, fn):
    try:
        out[key] = {"ok": True, "value": fn()}
    except Exception as exc:
        out[key] = {"ok": False, "type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
                    "message": str(exc)}

def done():
    tg = sys.modules.get("tmtguard.guards.transformers")  # what a plan left for the next call (none)
    out["planned_left"] = getattr(getattr(tg, "_planned", None), "files", None)
    print("RESULT " + json.dumps(out, default=repr))

def released(repo):  # a loaded model is freed once the application drops it
    import gc, weakref
    model = AutoModel.from_pretrained(repo, trust_remote_code=True)
    ref = weakref.ref(model)
    del model
    gc.collect()
    return ref() is None

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel  # the framework, imported up front
X = torch.tensor(%(x)r)
""" % {"x": X}


class Jobs:
    def __init__(self, fx):
        self.fx = fx
        self.jobs: dict = {}
        self.lock = threading.Lock()

    def start(self, name, body, *, mode="enforce", allow=(), extra_env=None, prepare=None, prelude=True):
        root = self.fx["root"]
        modules = root / f"modules-{name}"
        modules.mkdir()
        if prepare is not None:
            prepare(modules)
        env = hf.env_for(self.fx["cache"], modules)
        marks, events = root / f"marks-{name}.txt", root / f"events-{name}.jsonl"
        marks.write_text("")
        env.update({"TMT_MARKS": str(marks), "PYTHONPATH": str(self.fx["pydir"])})
        if mode:
            env.update({"TMTGUARD_MODE": mode, "TMTGUARD_EVENTS": str(events)})
        if allow:
            files = []
            for i, entries in enumerate(allow):
                files.append(write_allowlist(root / f"allow-{name}-{i}.yaml", entries))
            env["TMTGUARD_ALLOWLIST"] = os.pathsep.join(str(f) for f in files)
        env.update(extra_env or {})
        code = (PRELUDE if prelude else "") + body
        proc = hf.start_python(code, env, cwd=str(root / "work"))
        self.jobs[name] = {"proc": proc, "out": None, "marks": marks, "events": events, "modules": modules,
                           "lock": threading.Lock()}

    def result(self, name, timeout=900):
        job = self.jobs[name]
        with job["lock"]:
            if job["out"] is None:
                try:
                    out, err = job["proc"].communicate(timeout=timeout)
                except subprocess.TimeoutExpired:
                    job["proc"].kill()
                    out, err = job["proc"].communicate()
                job["out"] = (job["proc"].returncode, out, err)
        rc, out, err = job["out"]
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        assert rc == 0 and lines, f"{name}: rc={rc}\nstdout:\n{out}\nstderr:\n{err[-6000:]}"
        events = [json.loads(ln) for ln in job["events"].read_text().splitlines()] if job["events"].exists() else []
        return types.SimpleNamespace(out=json.loads(lines[-1][len("RESULT "):]), marks=job["marks"].read_text().splitlines(),
                                     events=events, modules=job["modules"], stderr=err)

    def close(self):
        for job in self.jobs.values():
            if job["proc"].poll() is None:
                job["proc"].kill()
            if job["out"] is None:
                job["proc"].communicate()


def remote_events(events, decision=None):
    return [e for e in events if e["action"] == "remote_code.load" and (decision is None or e["decision"] == decision)]


def chain_of(event):
    return [(f["loader"], f["artifact"]) for f in event["chain"]]


# --- scenarios -------------------------------------------------------------------------------------

LOAD = 'attempt("load", lambda: type(AutoModel.from_pretrained(%r, trust_remote_code=True)).__module__)\ndone()\n'


def s_transitive_blocked(j):
    j.start("transitive_blocked", LOAD % "acme/evil-transitive")


def s_relative_import(j):
    j.start("relative_import", LOAD % "acme/rel-import", allow=[j.fx["rel_allow"]])


def s_digest(j):
    j.start("digest", LOAD % "acme/digest", allow=[j.fx["digest_allow"]])


def s_tampered(j):
    j.start("tampered", LOAD % "acme/tampered", allow=[j.fx["tamper_allow"]],
            prepare=lambda modules: tamper_copy(modules, j.fx["tamper"]))


def plant(modules: Path, info: dict, name: str = "planted.py", label: str = "planted module ran", up: int = 0) -> Path:
    """A module with a payload that is no copy of any snapshot file, in the folder where the copies will go
    (or ``up`` folders above it)."""
    folder = (modules / hf.hub_module_relpath(info["code_repo"], info["code_commit"], "x")).parent
    for _ in range(up):
        folder = folder.parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(mark(label))
    return folder / name


def s_planted(j):
    # a model whose code imports no such module: the planted file never runs
    j.start("planted", LOAD % "acme/tampered", allow=[j.fx["tamper_allow"]],
            prepare=lambda modules: plant(modules, j.fx["tamper"]))


SIBLING = LOAD.replace("done()\n", "") % "acme/sibling" + """
from tmtguard import provenance as _p
_sib = [m for n, m in sys.modules.items() if n.endswith(".sibling_tiny") and getattr(m, "SIBLING", None)]
out["sibling"] = [_sib[0].SIBLING, [f.artifact for f in _p._model_code.get(_sib[0].__file__, ())]] if _sib else None
done()
"""


def plant_sibling(modules: Path, info: dict, source=None, name: str = "sibling_tiny.py") -> Path:
    """``sibling_tiny.py`` where the copies go: the snapshot's own file (``source`` None), or other bytes."""
    if source is None:
        source = info["snapshot_files"]["sibling_tiny.py"].read_bytes()
    path = plant(modules, info, name)
    path.write_bytes(source)
    return path


def s_sibling(j):
    fx = j.fx
    payload = ("SIBLING = 'planted'\n" + mark("planted sibling ran")).encode()
    extension = "sibling_tiny" + importlib.machinery.EXTENSION_SUFFIXES[0]
    j.start("sibling_copy", SIBLING, allow=[fx["sibling_allow"]],
            prepare=lambda modules: plant_sibling(modules, fx["sibling"]))
    j.start("sibling_planted", SIBLING, allow=[fx["sibling_allow"]],
            prepare=lambda modules: plant_sibling(modules, fx["sibling"], payload))
    j.start("sibling_planted_unguarded", SIBLING, mode=None,
            prepare=lambda modules: plant_sibling(modules, fx["sibling"], payload))
    j.start("sibling_extension", SIBLING, allow=[fx["sibling_allow"]],
            prepare=lambda modules: plant_sibling(modules, fx["sibling"], b"\x7fELF planted", extension))


def plant_bytecode(modules: Path, info: dict, prefix: Path | None = None, module: str = "configuration_tiny") -> Path:
    """An unchanged copy of the configuration file (or ``module``) with, where the import system will
    look for its cached bytecode (``__pycache__`` next to it, or under ``PYTHONPYCACHEPREFIX``), bytecode
    compiled from other source, stamped with the copy's mtime and size so that Python takes it as up
    to date."""
    import importlib.util
    from importlib._bootstrap_external import _code_to_timestamp_pyc

    copy = modules / hf.hub_module_relpath(info["code_repo"], info["code_commit"], module)
    copy.parent.mkdir(parents=True, exist_ok=True)
    source = info["code_files"][f"{module}.py"].read_text()
    copy.write_text(source)
    st = copy.stat()
    code = compile(source + "\n" + mark("planted bytecode ran"), str(copy), "exec")
    saved = sys.pycache_prefix
    sys.pycache_prefix = str(prefix) if prefix is not None else None
    try:
        pyc = Path(importlib.util.cache_from_source(str(copy)))
    finally:
        sys.pycache_prefix = saved
    pyc.parent.mkdir(parents=True, exist_ok=True)
    pyc.write_bytes(bytes(_code_to_timestamp_pyc(code, int(st.st_mtime), st.st_size)))
    return pyc


def s_bytecode(j):
    j.start("bytecode", LOAD % "acme/tampered", allow=[j.fx["tamper_allow"]],
            prepare=lambda modules: plant_bytecode(modules, j.fx["tamper"]))


def s_bytecode_unguarded(j):
    j.start("bytecode_unguarded", LOAD % "acme/tampered", mode=None,
            prepare=lambda modules: plant_bytecode(modules, j.fx["tamper"]))


def s_bytecode_helper(j):
    # the helper the modeling code imports relatively (by name, through the import system)
    allow = j.fx["root"] / "allow-pinned-helper.yaml"
    allow.write_text(pinning.render("acme/tiny-allowed", pinning.pin("acme/tiny-allowed", cache_dir=str(j.fx["cache"]))))
    for name, mode in (("bytecode_helper", "enforce"), ("bytecode_helper_unguarded", None)):
        j.start(name, LOAD % "acme/tiny-allowed", mode=mode, extra_env={"TMTGUARD_ALLOWLIST": str(allow)},
                prepare=lambda modules: plant_bytecode(modules, j.fx["allowed"], module="helpers_tiny"))


def s_bytecode_prefix(j):
    prefix = j.fx["root"] / "pyc-prefix"
    j.start("bytecode_prefix", LOAD % "acme/tampered", allow=[j.fx["tamper_allow"]],
            extra_env={"PYTHONPYCACHEPREFIX": str(prefix)},
            prepare=lambda modules: plant_bytecode(modules, j.fx["tamper"], prefix))


def s_bytecode_prefix_unguarded(j):
    prefix = j.fx["root"] / "pyc-prefix-unguarded"
    j.start("bytecode_prefix_unguarded", LOAD % "acme/tampered", mode=None,
            extra_env={"PYTHONPYCACHEPREFIX": str(prefix)},
            prepare=lambda modules: plant_bytecode(modules, j.fx["tamper"], prefix))


def plant_package_init(modules: Path, info: dict, up: int = 1) -> Path:
    """A package __init__.py with a payload in the code repo's folder (``up=1``), above the commit folder
    of the copies, or in the commit folder itself (``up=0``); transformers creates an empty one there,
    and keeps one that exists. It runs when the model's code first imports a module of its package
    that transformers did not load itself (the helper module): importing it imports the parent
    packages."""
    return plant(modules, info, "__init__.py", "package init ran", up=up)


def s_package_init(j):
    info = j.fx["rel"]
    allow = [("evil/rel-code", info["code_commit"], {n: digest(info["code_files"][n]) for n in
                                                     ("configuration_tiny.py", "modeling_tiny.py", "helpers_tiny.py")})]
    for up in (1, 0):
        j.start(f"package_init_{up}", LOAD % "acme/rel-import", allow=[allow],
                prepare=lambda modules, up=up: plant_package_init(modules, info, up))
        j.start(f"package_init_{up}_unguarded", LOAD % "acme/rel-import", mode=None,
                prepare=lambda modules, up=up: plant_package_init(modules, info, up))
    # a model whose code imports no module of its package: the planted file never runs, nor is it read
    j.start("package_init_never_imported", LOAD % "acme/tampered", allow=[j.fx["tamper_allow"]],
            prepare=lambda modules: plant_package_init(modules, j.fx["tamper"]))


def s_import_payload(j):
    j.start("import_payload", LOAD % "acme/importer", allow=[j.fx["importer_allow"]])


ALLOWED = r"""
import socket
from opentelemetry import trace as otel
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exported = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exported))
otel.set_tracer_provider(provider)  # the application's: tmtguard's load spans go there

def load_spans():  # (loader, artifact, depth, the parent span's artifact) of each load span
    by_id = {s.context.span_id: s for s in exported.get_finished_spans() if s.name == "tmtguard.load"}
    parent = lambda s: by_id[s.parent.span_id].attributes["tmtguard.artifact"] if s.parent and s.parent.span_id in by_id else None
    return sorted({(s.attributes["tmtguard.loader"], s.attributes["tmtguard.artifact"], s.attributes["tmtguard.depth"],
                    parent(s)) for s in by_id.values()}, key=repr)

def load_and_run():
    m = AutoModel.from_pretrained("acme/tiny-allowed", trust_remote_code=True)
    return {"module": type(m).__module__, "y": m(X).tolist(), "helper": m.helper_marker}
attempt("first", load_and_run)
attempt("spans", load_spans)
attempt("second", load_and_run)   # the class is registered now: served by the registry, same code
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
os.environ["TMT_CONNECT_PORT"] = str(srv.getsockname()[1])
m = AutoModel.from_pretrained("acme/tiny-allowed", trust_remote_code=True)
attempt("forward_connect", lambda: m(X).tolist())
attempt("moved", lambda: AutoModel.from_pretrained("acme/moved", trust_remote_code=True))
attempt("released", lambda: released("acme/tiny-allowed"))

def module_hash():  # transformers' own hash of the module and its relative imports, as it stored it
    import hashlib
    from pathlib import Path
    import transformers.dynamic_module_utils as dmu
    m = sys.modules[type(AutoModel.from_pretrained("acme/tiny-allowed", trust_remote_code=True)).__module__]
    own = getattr(dmu.get_relative_import_files, "_tmtguard_original", dmu.get_relative_import_files)
    files = [Path(m.__file__)] + sorted(map(Path, own(m.__file__)))
    return {"files": len(files), "same": hashlib.sha256(b"".join(bytes(f) + f.read_bytes() for f in files)).hexdigest()
            == m.__transformers_module_hash__, "shortcut": hasattr(dmu.get_relative_import_files, "_tmtguard_original")}
attempt("module_hash", module_hash)
done()
"""


def s_allowed(j):
    # the allowlist is `tmtguard pin` output, from the command line
    pinned = subprocess.run([sys.executable, "-m", "tmtguard", "pin", "acme/tiny-allowed", "--cache-dir", str(j.fx["cache"])],
                            capture_output=True, text=True, env={k: v for k, v in os.environ.items() if not k.startswith("TMTGUARD_")})
    assert pinned.returncode == 0, pinned.stderr
    j.fx["allowed_pin_text"] = pinned.stdout
    allow = j.fx["root"] / "allow-pinned.yaml"
    allow.write_text(pinned.stdout)
    moved = write_allowlist(j.fx["root"] / "allow-moved.yaml", j.fx["moved_allow"])
    j.start("allowed", ALLOWED, extra_env={"TMTGUARD_ALLOWLIST": os.pathsep.join([str(allow), str(moved)])})


REREGISTER_MODEL = r"""
attempt("trusted", lambda: type(AutoModel.from_pretrained("acme/trusted", trust_remote_code=True)).__module__)
attempt("mixed", lambda: type(AutoModel.from_pretrained("evil/mixed", trust_remote_code=True)).__module__)
attempt("trusted_again", lambda: type(AutoModel.from_pretrained("acme/trusted", trust_remote_code=True)).__module__)
done()
"""

REREGISTER_CONFIG = r"""
m = AutoModel.from_pretrained("acme/trusted", trust_remote_code=True)
AutoConfig.register("tmt-shared", type(m.config))   # the application makes the trusted classes local
attempt("own_config", lambda: type(AutoConfig.from_pretrained("evil/own-config", trust_remote_code=True)).__module__)
attempt("plain", lambda: type(AutoModel.from_pretrained("evil/plain")).__module__)
done()
"""


def s_rr_model(j):
    j.start("rr_model", REREGISTER_MODEL, allow=[j.fx["trusted_allow"]])


def s_rr_config(j):
    j.start("rr_config", REREGISTER_CONFIG, allow=[j.fx["trusted_allow"]])


LOCAL_EVIL = 'attempt("load", lambda: type(AutoModel.from_pretrained("./local-evil", trust_remote_code=True)).__module__)\ndone()\n'
LOCAL_OK = r"""
def run():
    m = AutoModel.from_pretrained("./local-ok", trust_remote_code=True)
    return {"module": type(m).__module__, "y": m(X).tolist()}
attempt("ok", run)
attempt("changed", lambda: type(AutoModel.from_pretrained("./local-changed", trust_remote_code=True)).__module__)
done()
"""


def s_local_blocked(j):
    j.start("local_blocked", LOCAL_EVIL)


def s_local_pinned(j):
    j.start("local_pinned", LOCAL_OK, allow=[j.fx["local_allow"]])


CONFIGS = r"""
attempt("ok", lambda: [type(c).__module__, c.hidden_size] if (c := AutoConfig.from_pretrained("acme/tiny-config-ok", trust_remote_code=True)) else None)
attempt("evil", lambda: type(AutoConfig.from_pretrained("acme/tiny-config-evil", trust_remote_code=True)).__module__)
from transformers.generation.utils import GenerationMixin
attempt("generate", lambda: GenerationMixin.load_custom_generate(object(), "acme/custom-generate", trust_remote_code=True)(None))
done()
"""


def s_configs(j):
    j.start("configs", CONFIGS, allow=[j.fx["config_allow"]])


def s_audit(j):
    j.start("audit", LOAD % "acme/evil-transitive", mode="audit")


UNGUARDED = r"""
attempt("evil", lambda: type(AutoModel.from_pretrained("acme/evil-transitive", trust_remote_code=True)).__module__)
attempt("importer", lambda: type(AutoModel.from_pretrained("acme/importer", trust_remote_code=True)).__module__)
attempt("tampered", lambda: type(AutoModel.from_pretrained("acme/tampered", trust_remote_code=True)).__module__)
attempt("local", lambda: type(AutoModel.from_pretrained("./local-evil", trust_remote_code=True)).__module__)
attempt("config", lambda: type(AutoConfig.from_pretrained("acme/tiny-config-evil", trust_remote_code=True)).__module__)
attempt("trusted", lambda: type(AutoModel.from_pretrained("acme/trusted", trust_remote_code=True)).__module__)
attempt("mixed", lambda: type(AutoModel.from_pretrained("evil/mixed", trust_remote_code=True)).__module__)
from transformers.generation.utils import GenerationMixin
attempt("generate", lambda: GenerationMixin.load_custom_generate(object(), "acme/custom-generate", trust_remote_code=True)(None))
attempt("released", lambda: released("acme/trusted"))
out["tmtguard_loaded"] = "tmtguard" in sys.modules
done()
"""


def s_unguarded(j):
    j.start("unguarded", UNGUARDED, mode=None, prepare=lambda modules: tamper_copy(modules, j.fx["tamper"]))


LATE = r"""
import json, os, sys
import transformers.dynamic_module_utils as dmu
import transformers.models.auto.auto_factory, transformers.models.auto.configuration_auto
import transformers.generation.utils, transformers.pipelines
from transformers import AutoModel   # auto_class_update() has copied from_pretrained into AutoModel already
before = {"auto_factory": hasattr(transformers.models.auto.auto_factory.get_class_from_dynamic_module, "_tmtguard_original")}
import tmtguard   # activates now (enforce), after transformers bound the originals by name
tmtguard.activate(mode="enforce")
sites = {}
for mod, names in {"transformers.models.auto.auto_factory": ["get_class_from_dynamic_module"],
                   "transformers.models.auto.configuration_auto": ["get_class_from_dynamic_module"],
                   "transformers.models.auto.tokenization_auto": ["get_class_from_dynamic_module"],
                   "transformers.pipelines": ["get_class_from_dynamic_module"],
                   "transformers.generation.utils": ["get_cached_module_file", "get_class_in_module"],
                   "transformers.dynamic_module_utils": ["get_class_from_dynamic_module", "get_cached_module_file",
                                                         "check_imports", "get_class_in_module"]}.items():
    m = sys.modules[mod]
    for n in names:
        f = getattr(m, n)
        sites[f"{mod}.{n}"] = hasattr(f, "_tmtguard_original") and f is getattr(dmu, n)
sites["AutoModel.from_pretrained"] = hasattr(AutoModel.from_pretrained, "_tmtguard_original")
sites["AutoModel.from_config"] = hasattr(AutoModel.from_config, "_tmtguard_original")
from transformers import AutoConfig
try:
    AutoConfig.from_pretrained("acme/tiny-config-evil", trust_remote_code=True)
    refused = None
except Exception as exc:
    refused = type(exc).__name__
tmtguard.deactivate()
restored = {n: not hasattr(getattr(dmu, n), "_tmtguard_original") for n in ("check_imports", "get_class_in_module")}
restored["auto_factory"] = not hasattr(transformers.models.auto.auto_factory.get_class_from_dynamic_module, "_tmtguard_original")
restored["AutoModel"] = not hasattr(AutoModel.from_pretrained, "_tmtguard_original")
print("RESULT " + json.dumps({"before": before, "sites": sites, "refused": refused, "restored": restored}))
"""


def s_late(j):
    j.start("late", LATE, mode=None, prelude=False)


SCENARIOS = {
    "test_transitive_repo_not_allowed": [s_transitive_blocked, s_unguarded],
    "test_relative_import_not_listed": [s_relative_import],
    "test_digest_mismatch_after_pin": [s_digest],
    "test_tampered_modules_cache_copy": [s_tampered, s_unguarded],
    "test_planted_module_next_to_the_copies": [s_planted, s_sibling],
    "test_planted_package_init_above_the_copies": [s_package_init],
    "test_planted_bytecode_of_a_copy_never_runs": [s_bytecode, s_bytecode_unguarded, s_bytecode_prefix,
                                                    s_bytecode_prefix_unguarded, s_bytecode_helper],
    "test_import_payload_never_imported": [s_import_payload, s_unguarded],
    "test_allowed_transitive_model_runs_and_is_model_code": [s_allowed],
    "test_pin_output_refuses_moved_code_repo": [s_allowed],
    "test_a_dropped_model_is_freed": [s_allowed, s_unguarded],
    "test_reregistration_model_class": [s_rr_model, s_unguarded],
    "test_reregistration_config_class_and_undeclared": [s_rr_config],
    "test_local_folder_blocked": [s_local_blocked, s_unguarded],
    "test_local_folder_pinned_and_changed": [s_local_pinned],
    "test_custom_config_class_and_custom_generate": [s_configs, s_unguarded],
    "test_audit_mode_chains": [s_audit],
    "test_late_activation_rebinds_every_site": [s_late],
}


@pytest.fixture(scope="session")
def jobs(fx, request):
    j = Jobs(fx)
    selected = {item.name for item in request.session.items}
    started = set()
    for test, starters in SCENARIOS.items():
        if test in selected:
            for start in starters:
                if start not in started:
                    started.add(start)
                    start(j)
    yield j
    j.close()


# --------------------------------------------------------------------------------------- the tests


def test_transitive_repo_not_allowed(fx, jobs):
    info = fx["evil"]
    r = jobs.result("transitive_blocked")
    assert r.out["load"]["ok"] is False and r.out["load"]["type"] == "RemoteCodeViolation"
    assert "PermissionError" in r.out["load"]["mro"]
    assert r.marks == []  # nothing from the code repo ran
    [event] = remote_events(r.events)
    target = f"evil/code@{info['code_commit']}/configuration_tiny.py"
    assert event["decision"] == "blocked" and event["target"] == target
    assert chain_of(event) == [("from_pretrained", f"acme/evil-transitive@{info['commit']}"), ("remote_code", target)]
    assert event["chain"][1]["sha256"] == digest(info["code_files"]["configuration_tiny.py"])
    assert event["detail"]["repo"] == "evil/code" and event["detail"]["revision"] == info["code_commit"]
    # the suggestion is the allowlist entry that would permit it, and it parses
    suggestion = event["allowlist"].split("\n# or")[0]
    rules = parse("version: 1\n" + suggestion, "suggestion.yaml").remote_code
    assert [(r_.repo, r_.revision) for r_ in rules] == [("evil/code", info["code_commit"])]
    assert dict(rules[0].files) == {"configuration_tiny.py": digest(info["code_files"]["configuration_tiny.py"])}
    assert "acme/evil-transitive" in r.out["load"]["message"] and target in r.out["load"]["message"]
    # without the guard the same load runs every payload
    u = jobs.result("unguarded")
    assert u.out["evil"]["ok"] and u.out["tmtguard_loaded"] is False
    assert {"configuration ran", "modeling ran", "helpers ran"} <= set(u.marks)


def test_relative_import_not_listed(fx, jobs):
    info = fx["rel"]
    r = jobs.result("relative_import")
    assert r.out["load"]["type"] == "RemoteCodeViolation"
    assert r.marks == []  # neither the helper nor the modeling file that imports it ran
    [event] = remote_events(r.events)
    assert event["target"] == f"evil/rel-code@{info['code_commit']}/helpers_tiny.py"
    assert "lists configuration_tiny.py, modeling_tiny.py, not helpers_tiny.py" in event["rule"]
    assert chain_of(event)[0] == ("from_pretrained", f"acme/rel-import@{info['commit']}")


def test_digest_mismatch_after_pin(fx, jobs):
    info = fx["digest"]
    r = jobs.result("digest")
    assert r.out["load"]["type"] == "RemoteCodeViolation"
    assert r.marks == []
    [event] = remote_events(r.events)
    pinned = dict(fx["digest_allow"][0][2])["modeling_tiny.py"]
    now = digest(info["code_files"]["modeling_tiny.py"])
    assert event["target"] == f"other/digest-code@{info['code_commit']}/modeling_tiny.py"
    assert f"has sha256 {now}" in event["rule"] and f"pins {pinned}" in event["rule"]
    assert event["detail"]["sha256"] == now


def test_tampered_modules_cache_copy(fx, jobs):
    info = fx["tamper"]
    r = jobs.result("tampered")
    assert r.out["load"]["type"] == "RemoteCodeViolation"
    assert r.marks == []
    [event] = remote_events(r.events)
    copy = r.modules / hf.hub_module_relpath(info["code_repo"], info["code_commit"], "configuration_tiny")
    assert event["target"] == f"other/tamper-code@{info['code_commit']}/configuration_tiny.py"
    assert "was modified" in event["rule"] and event["detail"]["copy"] == str(copy)
    assert event["detail"]["copy_sha256"] == digest(copy) != event["detail"]["sha256"]
    # the same planted copy runs when nothing checks it: transformers never compares it with the snapshot
    u = jobs.result("unguarded")
    assert u.out["tampered"]["ok"] and "tampered copy ran" in u.marks


def test_planted_module_next_to_the_copies(fx, jobs):
    """A module beside the copies runs only if the model's code imports it (transformers copies the
    relative imports it detects; ``from . import x`` it does not): checked as it is imported, it must be
    an unchanged copy of the snapshot's file of that name, decided like the model's code."""
    # nothing imports it: it never runs, and the load is not refused for it
    r = jobs.result("planted")
    assert r.out["load"]["ok"] and r.marks == [], r.out["load"]
    assert remote_events(r.events, "blocked") == []
    assert r.out["planned_left"] is None  # the plan's list of files is not handed to a later call
    info = fx["sibling"]
    target = f"acme/sibling@{info['commit']}/sibling_tiny.py"
    # an unchanged copy of the snapshot's file, pinned: runs as model code with its own frame
    r = jobs.result("sibling_copy")
    assert r.out["load"]["ok"], (r.out["load"], r.stderr[-2000:])
    value, chain = r.out["sibling"]
    assert value == "from the snapshot" and chain == [f"acme/sibling@{info['commit']}",
                                                      f"acme/sibling@{info['commit']}/modeling_tiny.py", target], chain
    # other bytes: refused as the model's code imports it, named by the chain of that code
    r = jobs.result("sibling_planted")
    assert r.out["load"]["type"] == "RemoteCodeViolation", r.out["load"]
    assert r.marks == [] and r.out["sibling"] is None
    [event] = remote_events(r.events)
    planted = r.modules / hf.hub_module_relpath("acme/sibling", info["commit"], "sibling_tiny")
    assert event["target"] == target
    assert event["rule"] == (f"the modules cache was modified: {planted} is not a copy of "
                             f"{info['snapshot_files']['sibling_tiny.py']}")
    assert event["detail"]["copy_sha256"] == digest(planted) and event["detail"]["module"].endswith(".sibling_tiny")
    assert chain_of(event)[-2:] == [("remote_code", f"acme/sibling@{info['commit']}/modeling_tiny.py"),
                                    ("remote_code", target)], chain_of(event)
    # what the check prevents: unguarded, the planted module runs
    u = jobs.result("sibling_planted_unguarded")
    assert u.out["load"]["ok"] and u.marks == ["planted sibling ran"] and u.out["sibling"][0] == "planted"
    # an extension module of the same name (Python would load it before the source): refused unloaded
    r = jobs.result("sibling_extension")
    assert r.out["load"]["type"] == "RemoteCodeViolation", r.out["load"]
    [event] = remote_events(r.events)
    assert event["rule"].startswith("the modules cache was modified: an extension module "), event["rule"]
    assert "that transformers did not copy there is imported as transformers_modules." in event["rule"]


def test_planted_package_init_above_the_copies(fx, jobs):
    """A package __init__ of the modules cache is checked as Python imports the package (here: the
    model's code imports its helper, which imports the commit's and the repo's packages), in the
    commit folder of the copies and above it."""
    info = fx["rel"]
    for up in (1, 0):
        r = jobs.result(f"package_init_{up}")
        assert r.out["load"]["type"] == "RemoteCodeViolation", (up, r.out["load"])
        assert r.marks == [], up
        [event] = remote_events(r.events)
        init = (r.modules / hf.hub_module_relpath(info["code_repo"], info["code_commit"], "x")).parent
        for _ in range(up):
            init = init.parent
        init = init / "__init__.py"
        assert event["rule"] == (f"the modules cache was modified: {init} is not the empty package file transformers "
                                 f"creates; no allowlist entry permits that: delete {init.parent} and transformers "
                                 "creates its packages and copies again")
        assert event["target"] == str(init) and event["detail"]["package"].startswith("transformers_modules.")
        # named by the model code that imported the package
        assert chain_of(event)[-1] == ("remote_code", f"evil/rel-code@{info['code_commit']}/modeling_tiny.py"), chain_of(event)
        # what the check prevents: unguarded, the planted package file runs when the model imports its helper
        u = jobs.result(f"package_init_{up}_unguarded")
        assert u.out["load"]["ok"] and "package init ran" in u.marks, (up, u.out["load"], u.marks)
    # a package nothing imports: its __init__ never runs, and the load is not refused for it
    r = jobs.result("package_init_never_imported")
    assert r.out["load"]["ok"] and r.marks == [], r.out["load"]
    assert remote_events(r.events, "blocked") == []


def test_planted_bytecode_of_a_copy_never_runs(fx, jobs):
    """Cached bytecode stamped as up to date with a verified copy is removed before the copy runs, in
    ``__pycache__`` next to it and under ``PYTHONPYCACHEPREFIX``: the verified source runs instead."""
    for name in ("bytecode", "bytecode_prefix", "bytecode_helper"):
        r = jobs.result(name)
        assert r.out["load"]["ok"], (name, r.out["load"], r.stderr[-2000:])
        assert r.marks == [], name
    # what the removal prevents: unguarded, Python runs the planted bytecode instead of the source
    for name in ("bytecode_unguarded", "bytecode_prefix_unguarded", "bytecode_helper_unguarded"):
        u = jobs.result(name)
        assert u.out["load"]["ok"] and u.marks == ["planted bytecode ran"], (name, u.out["load"], u.marks)


def test_import_payload_never_imported(fx, jobs):
    info = fx["importer"]
    r = jobs.result("import_payload")
    assert r.out["load"]["type"] == "RemoteCodeViolation"
    assert "evilmod imported" not in r.marks and r.marks == []
    [event] = remote_events(r.events)
    assert event["target"] == f"acme/importer@{info['commit']}/modeling_tiny.py"
    # code in the model's own repo: the chain's head and the code are the same repo
    assert chain_of(event) == [("from_pretrained", f"acme/importer@{info['commit']}"), ("remote_code", event["target"])]
    u = jobs.result("unguarded")
    assert u.marks.index("evilmod imported") < u.marks.index("importer modeling ran")  # check_imports first


def test_allowed_transitive_model_runs_and_is_model_code(fx, jobs):
    info = fx["allowed"]
    pinned = parse(fx["allowed_pin_text"], "pin.yaml").remote_code
    assert [(p.repo, p.revision) for p in pinned] == [("other/code-ok", info["code_commit"])]
    assert {n for n, _ in pinned[0].files} == {"configuration_tiny.py", "modeling_tiny.py", "helpers_tiny.py"}
    r = jobs.result("allowed")
    for key in ("first", "second"):
        assert r.out[key]["ok"], r.out[key]
        assert r.out[key]["value"]["module"] == info["module_names"]["modeling_tiny"]
        assert r.out[key]["value"]["helper"] == hf.HELPER_MARKER
        y = r.out[key]["value"]["y"]
        assert all(abs(a - b) < 1e-5 for a, b in zip(y, hf.expected_output(info["weights"], X)))
    assert [e for e in remote_events(r.events) if "code-ok" in e["target"]] == []  # allowed: no event
    # allowing the code granted it nothing else: its forward() at inference is model code of the load
    assert r.out["forward_connect"]["ok"] is False and r.out["forward_connect"]["type"] == "NetworkViolation"
    [net] = [e for e in r.events if e["action"] == "network.connect"]
    assert chain_of(net) == [("from_pretrained", f"acme/tiny-allowed@{info['commit']}"),
                             ("remote_code", f"other/code-ok@{info['code_commit']}/modeling_tiny.py")]
    assert net["origin"]["file"].endswith(hf.hub_module_relpath("other/code-ok", info["code_commit"], "modeling_tiny"))
    # each step of the load is a span of the application's provider: the model, the code file inside it
    model = f"acme/tiny-allowed@{info['commit']}"
    code = [f"other/code-ok@{info['code_commit']}/{f}" for f in ("configuration_tiny.py", "modeling_tiny.py")]
    assert r.out["spans"]["ok"], r.out["spans"]
    spans = {tuple(s) for s in r.out["spans"]["value"]}
    assert ("from_pretrained", model, 1, None) in spans
    assert {("remote_code", c, 2, model) for c in code} <= spans, spans
    # the plan's list of relative-import files, handed to transformers' module hash, is transformers' own
    assert r.out["module_hash"] == {"ok": True, "value": {"files": 3, "same": True, "shortcut": True}}


def test_a_dropped_model_is_freed(fx, jobs):
    # the guard keeps what it decided (records, chains) but nothing of the load itself: a frame kept
    # past its load held the whole stack's locals, the model among them, for the life of the process
    assert jobs.result("unguarded").out["released"] == {"ok": True, "value": True}
    assert jobs.result("allowed").out["released"] == {"ok": True, "value": True}


def test_pin_output_refuses_moved_code_repo(fx, jobs):
    info = fx["moved"]
    r = jobs.result("allowed")
    assert r.out["moved"]["type"] == "RemoteCodeViolation"
    assert "moved main ran" not in r.marks
    [event] = [e for e in remote_events(r.events) if "moved-code" in e["target"]]
    assert event["target"] == f"other/moved-code@{fx['moved_new_commit']}/configuration_tiny.py"
    assert f"only at {info['code_commit']}" in event["rule"]


def test_reregistration_model_class(fx, jobs):
    r = jobs.result("rr_model")
    trusted_module = fx["trusted"]["module_names"]["modeling_tiny"]
    assert r.out["trusted"] == {"ok": True, "value": trusted_module}
    # evil/mixed names the trusted config code and its own model code: the registry would hand it the
    # trusted model class without running its code; that is decided, and refused
    assert r.out["mixed"]["type"] == "RemoteCodeViolation"
    assert "rr modeling ran" not in r.marks and r.marks == []
    [event] = remote_events(r.events)
    assert event["target"] == f"evil/rr-code@{fx['rr_code_commit']}/modeling_tiny.py"
    assert event["detail"]["registered_from"] == f"other/trusted-code@{fx['trusted']['code_commit']}/modeling_tiny.py"
    assert "would hand it" in event["rule"]
    assert chain_of(event)[0] == ("from_pretrained", f"evil/mixed@{fx['mixed_commit']}")
    assert r.out["trusted_again"] == {"ok": True, "value": trusted_module}
    # unguarded, evil/mixed silently gets the trusted class (its own code never even asked for)
    u = jobs.result("unguarded")
    assert u.out["mixed"] == {"ok": True, "value": trusted_module}


def test_reregistration_config_class_and_undeclared(fx, jobs):
    r = jobs.result("rr_config")
    assert r.out["own_config"]["type"] == "RemoteCodeViolation"
    assert r.out["plain"]["type"] == "RemoteCodeViolation"
    assert r.marks == []
    own, plain = remote_events(r.events)
    assert own["target"] == f"evil/rr-code@{fx['rr_code_commit']}/configuration_tiny.py"
    assert own["detail"]["registered_from"].endswith("/configuration_tiny.py")
    assert plain["target"] == f"evil/plain@{fx['plain_commit']}"
    assert "declares no remote code" in plain["rule"]
    assert "repo: evil/plain" in plain["allowlist"]


def test_local_folder_blocked(fx, jobs):
    info = fx["local_evil"]
    r = jobs.result("local_blocked")
    assert r.out["load"]["type"] == "RemoteCodeViolation"
    assert r.marks == []
    [event] = remote_events(r.events)
    folder = os.path.realpath(info["path"])
    revision = remote_code.local_revision(folder)
    assert event["target"] == f"{folder}@{revision}/configuration_tiny.py"
    assert chain_of(event) == [("from_pretrained", folder), ("remote_code", event["target"])]
    u = jobs.result("unguarded")
    assert {"local configuration ran", "local modeling ran"} <= set(u.marks)


def test_local_folder_pinned_and_changed(fx, jobs):
    info = fx["local_ok"]
    r = jobs.result("local_pinned")
    assert r.out["ok"]["ok"], r.out["ok"]
    y = r.out["ok"]["value"]["y"]
    assert all(abs(a - b) < 1e-5 for a, b in zip(y, hf.expected_output(info["weights"], X)))
    assert r.out["changed"]["type"] == "RemoteCodeViolation"
    assert "changed local ran" not in r.marks
    [event] = remote_events(r.events)
    assert event["target"].startswith(os.path.realpath(fx["local_changed"]["path"]) + "@")
    assert "only at" in event["rule"]  # the folder's code revision changed with the file


def test_custom_config_class_and_custom_generate(fx, jobs):
    r = jobs.result("configs")
    assert r.out["ok"] == {"ok": True, "value": [fx["config_ok"]["module_names"]["configuration_tiny"], 4]}
    assert r.out["evil"]["type"] == "RemoteCodeViolation"
    assert r.marks == []
    config_event, generate_event = remote_events(r.events)
    assert chain_of(config_event) == [("from_pretrained", f"acme/tiny-config-evil@{fx['config_evil']['commit']}"),
                                      ("remote_code", f"evil/config-code@{fx['config_evil']['code_commit']}/configuration_tiny.py")]
    # custom_generate: a nested file, reached through generation.utils' by-name bindings
    assert r.out["generate"]["type"] == "RemoteCodeViolation"
    assert generate_event["target"] == f"acme/custom-generate@{fx['gen_commit']}/custom_generate/generate.py"
    assert "custom_generate/helper.py: sha256:" in generate_event["allowlist"]
    u = jobs.result("unguarded")
    assert u.out["config"]["ok"] and "config code ran" in u.marks
    assert u.out["generate"] == {"ok": True, "value": "generated"} and "custom generate ran" in u.marks


def test_audit_mode_chains(fx, jobs):
    info = fx["evil"]
    r = jobs.result("audit")
    assert r.out["load"] == {"ok": True, "value": info["module_names"]["modeling_tiny"]}  # audit never blocks
    events = remote_events(r.events)
    assert {e["decision"] for e in events} == {"audited"}
    head = ("from_pretrained", f"acme/evil-transitive@{info['commit']}")
    got = {e["target"]: chain_of(e) for e in events}
    for name in ("configuration_tiny.py", "modeling_tiny.py", "helpers_tiny.py"):
        target = f"evil/code@{info['code_commit']}/{name}"
        assert got[target] == [head, ("remote_code", target)]


def test_late_activation_rebinds_every_site(jobs):
    r = jobs.result("late")
    assert r.out["before"] == {"auto_factory": False}
    assert all(r.out["sites"].values()), r.out["sites"]
    assert r.out["refused"] == "RemoteCodeViolation"
    assert all(r.out["restored"].values()), r.out["restored"]


# --------------------------------------------------------------------------------------- in process


def test_tmtguard_never_imports_transformers(tmp_path):
    code = "import sys, tmtguard; print(sorted(m for m in ('transformers', 'huggingface_hub', 'torch') if m in sys.modules))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMTGUARD_")}
    env["TMTGUARD_MODE"] = "enforce"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _fake_dmu(**overrides):
    module = types.ModuleType(hfguard.DMU)
    src = '''
HF_MODULES_CACHE = "/nonexistent"
def get_relative_import_files(module_file): return []
def check_imports(filename):
    return importlib.import_module(filename)
def get_cached_module_file(pretrained_model_name_or_path, module_file, revision=None):
    return check_imports(module_file)
def get_class_in_module(class_name, module_path, *, force_reload=False):
    return spec_from_file_location(HF_MODULES_CACHE).loader.exec_module(get_relative_import_files)
def get_class_from_dynamic_module(class_reference, pretrained_model_name_or_path, **kwargs):
    return get_class_in_module(class_reference, get_cached_module_file(pretrained_model_name_or_path, class_reference))
'''
    exec(compile(src, "<fake dynamic_module_utils>", "exec"), module.__dict__)
    for name, value in overrides.items():
        setattr(module, name, value)
    for value in vars(module).values():
        if isinstance(value, types.FunctionType):
            value.__module__ = hfguard.DMU
    return module


def test_internals_check_accepts_the_shape_it_guards():
    hfguard._verify(_fake_dmu())


def test_changed_internals_fail_loudly(guard):
    events = guard(mode="enforce")
    ns: dict = {}
    exec("def get_cached_module_file(pretrained_model_name_or_path, module_file):\n    return module_file\n"
         "def run(path):\n    return importlib.util.spec_from_file_location('x', path).loader.exec_module(path)\n", ns)
    fake = _fake_dmu(get_cached_module_file=ns["get_cached_module_file"], run_module_code=ns["run"])
    with pytest.raises(tmtguard.GuardError) as err:
        hfguard._patch_dmu(fake)
    message = str(err.value)
    assert "get_cached_module_file no longer calls check_imports" in message
    assert "run_module_code uses exec_module" in message or "run_module_code uses spec_from_file_location" in message
    assert events and events[-1]["action"] == "remote_code.load" and events[-1]["decision"] == "blocked"
    assert not hasattr(fake.check_imports, "_tmtguard_original")  # nothing half-patched
    # audit: recorded, never raised
    events = guard(mode="audit")
    hfguard._patch_dmu(fake)
    assert events[-1]["decision"] == "audited" and "no longer match" in events[-1]["rule"]


def test_match_reasons(tmp_path):
    src = parse(
        "version: 1\nremote_code:\n  allow:\n"
        "    - repo: org/code\n      revision: " + "a" * 40 + "\n      files:\n        m.py: sha256:" + "b" * 64 + "\n"
        "    - repo: " + str(tmp_path) + "\n      revision: " + remote_code.local_revision(str(tmp_path)) + "\n",
        "x.yaml").remote_code
    code = remote_code.CodeFile("org/code", "a" * 40, "m.py", "/x/m.py")
    assert remote_code.match(src, code, "b" * 64)[0] is not None
    assert "pins " + "b" * 64 in remote_code.match(src, code, "c" * 64)[1]
    other = remote_code.CodeFile("org/code", "a" * 40, "n.py", "/x/n.py")
    assert "lists m.py, not n.py" in remote_code.match(src, other, "b" * 64)[1]
    assert "only at " + "a" * 40 in remote_code.match(src, remote_code.CodeFile("org/code", "d" * 40, "m.py", ""), "b" * 64)[1]
    assert "no remote_code.allow entry names org/else" in remote_code.match(src, remote_code.CodeFile("org/else", "a" * 40, "m.py", ""), None)[1]
    # a branch name never matches, even where a rule's revision is spelled the same way
    assert remote_code.match(src, remote_code.CodeFile("org/code", "main", "m.py", ""), "b" * 64)[0] is None
    # a local folder: by real path and its code revision; no files listed -> any file of that revision
    (tmp_path / "modeling_x.py").write_text("x = 1\n")
    rev = remote_code.local_revision(str(tmp_path))
    local = remote_code.local_file(str(tmp_path), str(tmp_path / "modeling_x.py"))
    assert local.revision == rev and local.file == "modeling_x.py" and local.repo == os.path.realpath(tmp_path)
    assert remote_code.match(src, local, None)[0] is None  # the revision changed with the new file
    # the hub layout
    hub = remote_code.hub_file(f"/c/models--org--my-model/snapshots/{'e' * 40}/sub/gen.py")
    assert (hub.repo, hub.revision, hub.file) == ("org/my-model", "e" * 40, "sub/gen.py")


def test_pin_cli_errors_and_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMTGUARD_")}
    proc = subprocess.run([sys.executable, "-m", "tmtguard", "pin", "nobody/nothing", "--cache-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "not in the local cache" in proc.stderr
    info = hf.local_custom_folder(tmp_path / "m", with_helper=True)
    text = pinning.render(str(info["path"]), pinning.pin(str(info["path"])))
    [rule] = parse(text, "pin.yaml").remote_code
    assert rule.repo == os.path.realpath(info["path"]) and rule.revision == remote_code.local_revision(rule.repo)
    assert dict(rule.files) == {n: digest(info["files"][n]) for n in ("configuration_tiny.py", "modeling_tiny.py", "helpers_tiny.py")}


def test_a_copy_runs_only_as_compiled_from_the_bytes_decided(guard, tmp_path):
    """A modules-cache copy planned to run is checked on its compile event (the bytes Python compiles),
    and its module body runs only if that check passed just before: not from cached bytecode, which
    raises no compile event. Through the real import machinery, in this process."""
    import hashlib
    import importlib.util
    from importlib._bootstrap_external import _code_to_timestamp_pyc

    names = ("tmt_copy_decided", "tmt_copy_changed", "tmt_copy_changed_alias", "tmt_copy_bytecode",
             "tmt_copy_bytecode_audit")
    allow = tmp_path / "allow.yaml"  # the import guard lets these module names run (not model code here)
    allow.write_text("version: 1\nimports:\n  allow: [" + ", ".join(names) + "]\n")
    events = guard(mode="enforce", allowlists=[allow])
    source = b"VALUE = 'decided'\n"
    copy = tmp_path / "transformers_modules" / "org" / "x" / ("a" * 40) / "modeling_x.py"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(source)
    real = os.path.realpath(copy)
    code = remote_code.CodeFile("org/x", "a" * 40, "modeling_x.py", str(copy), False)
    rec = hfguard._Record(code, hashlib.sha256(source).hexdigest())

    alias = tmp_path / "alias" / "transformers_modules" / "org" / "x" / ("a" * 40) / "modeling_x.py"
    alias.parent.parent.parent.parent.parent.mkdir()
    alias.parent.parent.parent.parent.symlink_to(tmp_path / "transformers_modules")  # the cache by another name

    def run(name, before=None, path=copy):
        frames, token = hfguard._push(None, hfguard._code_spec(code, rec.digest))
        try:
            hfguard._expect(str(copy), real, rec, tmtguard.provenance.peek())  # what get_class_in_module's plan does
            if before is not None:
                with tmtguard.provenance.internal():  # another process, in reality: not this chain's action
                    before()
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        finally:
            tmtguard.provenance.pop_many(frames, token)

    planted = compile("VALUE = 'planted bytecode'\n", str(copy), "exec")  # (no chain acting: not checked)

    def plant_bytecode():  # compiled from other source, stamped as up to date with the copy
        st = copy.stat()
        pyc = Path(importlib.util.cache_from_source(str(copy)))
        pyc.parent.mkdir(exist_ok=True)
        pyc.write_bytes(bytes(_code_to_timestamp_pyc(planted, int(st.st_mtime), st.st_size)))

    try:
        assert run("tmt_copy_decided").VALUE == "decided"
        copy.write_bytes(b"VALUE = 'changed'\n")
        with pytest.raises(tmtguard.RemoteCodeViolation, match="the copy was modified"):
            run("tmt_copy_changed")
        assert events[-1]["detail"]["copy_sha256"] == hashlib.sha256(b"VALUE = 'changed'\n").hexdigest()
        with pytest.raises(tmtguard.RemoteCodeViolation, match="the copy was modified"):
            run("tmt_copy_changed_alias", path=alias)  # the same file through a link: found by its real path
        assert events[-1]["detail"]["copy"] == str(alias)
        copy.write_bytes(source)
        with pytest.raises(tmtguard.RemoteCodeViolation, match="about to run from cached bytecode"):
            run("tmt_copy_bytecode", plant_bytecode)
        # what the check prevents, and audit never blocks: the planted bytecode runs, recorded
        events = guard(mode="audit", allowlists=[allow])
        assert run("tmt_copy_bytecode_audit", plant_bytecode).VALUE == "planted bytecode"
        assert events[-1]["decision"] == "audited" and "cached bytecode" in events[-1]["rule"]
    finally:
        hfguard._expected.pop(real, None)
        hfguard._expected.pop(str(copy), None)
        hfguard._cache_folders.pop(os.path.dirname(real), None)


@pytest.mark.parametrize("planted", ["fifo", "empty file", "code", "extension", "bytecode"])
def test_a_package_file_must_be_the_empty_file_transformers_creates(tmp_path, planted):
    """A package __init__ of the modules cache must be the empty regular __init__.py transformers
    creates: not a FIFO (size 0 too: Python importing the package would read whatever a writer sends
    into it), not code, not an extension module; cached bytecode stamped as up to date with the empty
    file is removed before Python looks for it."""
    import importlib.machinery
    import importlib.util

    folder = tmp_path / "transformers_modules" / "org"
    folder.mkdir(parents=True)
    init = folder / ("__init__" + importlib.machinery.EXTENSION_SUFFIXES[0] if planted == "extension" else "__init__.py")
    if planted == "fifo":
        os.mkfifo(init)
    else:
        init.write_text("raise SystemExit('package init ran')\n" if planted == "code" else "")
    pyc = Path(importlib.util.cache_from_source(str(folder / "__init__.py")))
    if planted == "bytecode":
        pyc.parent.mkdir()
        pyc.write_bytes(b"planted")
    problem = hfguard._package_file_problem(str(init))
    if planted in ("empty file", "bytecode"):
        assert problem is None and not pyc.exists()
    else:
        assert problem == f"{init} is not the empty package file transformers creates"


@pytest.mark.parametrize("folder", ["/m/c/x", "/m/c/x/", "/m//c/x", "m/c", "/", "m", "/m/./c", "/m/../c"])
@pytest.mark.parametrize("name", ["x.py", "../x.py", "./x.py", "y/x.py", ".", "..", "x..py", ".py", "x.y.py", "x.pyw"])
def test_the_plan_names_files_as_os_path_would(folder, name):
    """The plan's string shortcuts give os.path's answers: abspath, relpath, dirname + basename, and
    the snapshot-relative name of a relative import (normpath of a join)."""
    from tmtguard.guards import transformers as tg

    path = folder + "/" + name
    assert tg._relative_name(path, folder) == os.path.relpath(path, folder)
    if path.startswith("/"):
        assert tg._abspath(path) == os.path.abspath(path)
    if tg._clean(path):
        assert os.path.normpath(path) == path
    # the cached bytecode the plan removes is where the import system would look for it
    assert tg._pyc_of(path) == importlib.util.cache_from_source(path)
    for inside in ("", "sub", "sub/deeper", "sub/../x", "./sub"):
        plain = tg._plain(name) and (not inside or tg._clean(inside))
        if plain:
            joined = f"{inside}/{name}" if inside else name
            assert joined == os.path.normpath(os.path.join(inside, name))


def test_the_plan_lists_the_relative_imports_transformers_would(tmp_path, monkeypatch):
    """The plan's string-join listing of a copy's relative imports is transformers' own list: chains of
    relative imports, a file reached twice, a copy at the top of a folder, a relative path; and for an
    import that is no plain name (``from .. import x``, ``from ./x``) transformers' function decides."""
    import transformers.dynamic_module_utils as dmu

    folder = tmp_path / "copy"
    folder.mkdir()
    files = {
        "main.py": "from .a import x\nimport .b\nfrom .shared import s\n",
        "a.py": "from .c import y\nfrom .shared import s\n",
        "b.py": "",
        "c.py": "from .d import z\n",
        "d.py": "import torch\n",
        "shared.py": "",
        "dotted.py": "from ..up import q\n",  # ".up": a plain name here (a file named .up.py)
        ".up.py": "",
        "dots.py": "from .. import q\n",  # "." : the parent folder itself, transformers' Path decides
        "slash.py": "from ./b import q\n",  # "/b": an absolute path, likewise
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    (tmp_path / "copy.py").write_text("")  # what "from .. import q" names, to transformers
    monkeypatch.setitem(sys.modules, hfguard.DMU, dmu)
    for name in ("main.py", "a.py", "c.py", "d.py", "dotted.py"):
        path = str(folder / name)
        assert sorted(hfguard._relative_import_files(path)) == sorted(dmu.get_relative_import_files(path))
    assert sorted(hfguard._relative_import_files(str(folder / "main.py"))) == sorted(
        str(folder / n) for n in ("a.py", "b.py", "shared.py", "c.py", "d.py"))
    # given the records the copies were decided as: the list for the decided bytes (the memo, by their
    # digests), without reading the copies: here main.py changes afterwards (such a copy is refused as
    # it compiles) and the list stays that of the decided bytes
    import hashlib

    assert getattr(dmu.get_relative_imports, "_tmtguard_original", None) is not None  # the memo is in front

    def decided(name):
        path = str(folder / name)
        dmu.get_relative_imports(path)  # what check_imports does with the snapshot file
        return hfguard._Record(None, hashlib.sha256((folder / name).read_bytes()).hexdigest())

    main = decided("main.py")
    monkeypatch.setitem(hfguard._fetched, str(folder / "a.py"), decided("a.py"))
    want = sorted(hfguard._relative_import_files(str(folder / "main.py")))
    (folder / "main.py").write_text("import torch\n")
    assert sorted(hfguard._relative_import_files(str(folder / "main.py"), main)) == want
    assert hfguard._relative_import_files(str(folder / "main.py")) == []  # what reading it says
    (folder / "main.py").write_text(files["main.py"])
    monkeypatch.chdir(folder)
    assert sorted(hfguard._relative_import_files("main.py")) == sorted(dmu.get_relative_import_files("main.py"))
    calls = []
    real = dmu.get_relative_import_files

    def counted(module_file):
        calls.append(module_file)
        return real(module_file)

    monkeypatch.setattr(dmu, "get_relative_import_files", counted)
    dots = str(folder / "dots.py")
    assert hfguard._relative_import_files(dots) == real(dots) == [str(tmp_path / "copy.py")]
    with pytest.raises(FileNotFoundError):  # /b.py: what transformers itself would fail on
        hfguard._relative_import_files(str(folder / "slash.py"))
    assert calls == [dots, str(folder / "slash.py")]  # not plain names: transformers' own function
    assert hfguard._path_str(str(folder / "main.py")) == str(Path(folder / "main.py"))
    for messy in (str(folder) + "//main.py", str(folder) + "/./main.py", str(folder) + "/", "./main.py"):
        assert hfguard._path_str(messy) == str(Path(messy))
