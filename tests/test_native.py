"""native.load: libraries, symbol lookups and sub-interpreters asked for by guarded loads and model code,
and torch.package modules as model code."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import pytest

import payloads as P
import tmtguard
from conftest import write_allowlist

LIBC_SYSTEM = """ctypes.CDLL(None).system({command!r})"""


def libc_hub(tmp_path, marker):
    return P.hub_folder(tmp_path, LIBC_SYSTEM.format(command=f"touch {marker}".encode()), net_imports="import ctypes")


def test_ctypes_payload_is_real(unguarded, tmp_path, marker):
    P.infer(P.load_hub(libc_hub(tmp_path, marker)))
    assert marker.exists(), "libc's system() through ctypes: no process guard can see it once called"


def test_ctypes_symbol_lookup_by_model_code_blocked(guard, tmp_path, marker):
    folder = libc_hub(tmp_path, marker)
    events = guard(allowlists=[write_allowlist(tmp_path / "n.yaml", "version: 1\nnative:\n  allow: ['<process>:getpid']\n")])
    model = P.load_hub(folder)
    with pytest.raises(tmtguard.NativeViolation) as info:
        P.infer(model)
    assert not marker.exists()
    [ev] = P.of(events, "native.load")
    assert ev["target"] == "<process>:system" and ev["detail"]["symbol"] == "system"
    assert ev["chain"][0]["loader"] == "torch.hub.load"
    assert (ev["origin"]["file"], ev["origin"]["line"]) == P.forward_line(folder, "ctypes.CDLL")
    assert isinstance(info.value, OSError)


def test_ctypes_library_load_blocked_and_audited(guard, tmp_path):
    libm = ctypes.util.find_library("m") or "libm.so.6"
    events = guard()
    with tmtguard.guarded_load("custom.load", str(tmp_path / "model.bin")):
        with pytest.raises(tmtguard.NativeViolation, match="libm"):
            ctypes.CDLL(libm)
    guard(mode="audit")
    with tmtguard.guarded_load("custom.load", str(tmp_path / "model.bin")):
        assert ctypes.CDLL(libm).cos  # goes on
    assert [e["decision"] for e in P.of(events, "native.load")][:2] == ["blocked", "audited"]


def test_native_allow_permits_a_library_and_its_symbols(guard, tmp_path):
    libm = ctypes.util.find_library("m") or "libm.so.6"
    events = guard(allowlists=[write_allowlist(tmp_path / "n.yaml", "version: 1\nnative:\n  allow: ['libm.so*']\n")])
    with tmtguard.guarded_load("custom.load", str(tmp_path / "model.bin")):
        lib = ctypes.CDLL(libm)
        lib.cos.restype = ctypes.c_double
        lib.cos.argtypes = [ctypes.c_double]
        assert lib.cos(0.0) == 1.0
    assert events == []


def test_symbol_rule_permits_only_that_symbol(guard, tmp_path, marker):
    events = guard(allowlists=[write_allowlist(tmp_path / "n.yaml", "version: 1\nnative:\n  allow: ['<process>:getpid']\n")])
    with tmtguard.guarded_load("custom.load", str(tmp_path / "model.bin")):
        assert ctypes.CDLL(None).getpid() == os.getpid()
        with pytest.raises(tmtguard.NativeViolation):
            ctypes.CDLL(None).system
    assert [e["target"] for e in events] == ["<process>:system"]


def test_application_ctypes_untouched(guard, tmp_path, marker):
    events = guard()
    P.load_hub(P.hub_folder(tmp_path, "pass"))
    ctypes.CDLL(None).system(f"touch {marker}".encode())
    assert marker.exists() and events == []


def test_subinterpreter_refused(guard, tmp_path):
    import _xxsubinterpreters as interpreters  # imported by the application: only creating one is decided

    events = guard()
    with tmtguard.guarded_load("custom.load", str(tmp_path / "model.bin")):
        # the refusal comes from the audit hook inside C, which reports it as its own RuntimeError
        with pytest.raises((tmtguard.NativeViolation, RuntimeError)):
            interpreters.create()
    [ev] = events
    assert ev["target"] == "<subinterpreter>" and ev["decision"] == "blocked"
    assert "sub-interpreter" in ev["rule"]


# --- torch.package -----------------------------------------------------------------------------------


PACKAGED = """
import os

def run(path):
    os.system("touch " + path)
    return 1
"""


def package(tmp_path):
    from torch.package import PackageExporter

    path = tmp_path / "model.pkg"
    with PackageExporter(str(path)) as exporter:
        exporter.save_source_string("acme_model", PACKAGED)
    return path


def test_torch_package_module_is_model_code_of_its_archive(guard, tmp_path, marker):
    from torch.package import PackageImporter

    path = package(tmp_path)
    events = guard()
    module = PackageImporter(str(path)).import_module("acme_model")  # compiling it is importing model code
    assert events == []
    with pytest.raises(tmtguard.ProcessViolation):
        module.run(str(marker))  # later, from application code
    assert not marker.exists()
    [ev] = P.of(events, "process.spawn")
    assert ev["chain"][0] == {"loader": "torch.package", "artifact": str(path), "sha256": ev["chain"][0]["sha256"]}
    assert ev["origin"]["function"] == "run"


def test_torch_package_payload_is_real(unguarded, tmp_path, marker):
    from torch.package import PackageImporter

    PackageImporter(str(package(tmp_path))).import_module("acme_model").run(str(marker))
    assert marker.exists()
