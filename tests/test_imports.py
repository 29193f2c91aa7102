"""import: a module guarded loads or model code newly import is decided before its body runs."""
from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import shutil
import sys
import sysconfig

import pytest

import artifacts as A
import payloads as P
import tmtguard
from conftest import run_python, subprocess_env, write_allowlist
from tmtguard.guards import imports as import_guard


@pytest.fixture
def outside(tmp_path):
    """A folder on sys.path that is not the model's: an installed-looking third-party location."""
    folder = tmp_path / "site"
    folder.mkdir()
    yield folder
    if str(folder) in sys.path:
        sys.path.remove(str(folder))


def hub_importing(tmp_path, name, where="hubconf"):
    if where == "hubconf":
        return P.hub_folder(tmp_path, "pass", hubconf_body=f"import {name}")
    return P.hub_folder(tmp_path, f"import {name}")


# --- a module whose body is the payload --------------------------------------------------------------


def test_payload_module_runs_when_unguarded(unguarded, tmp_path, outside, marker):
    name = P.payload_module(outside, marker)
    P.load_hub(hub_importing(tmp_path, name))
    assert marker.exists()


def test_model_code_import_blocked_before_module_body_runs(guard, tmp_path, outside, marker):
    name = P.payload_module(outside, marker)
    folder = hub_importing(tmp_path, name)
    events = guard()
    with pytest.raises(tmtguard.ImportViolation) as info:
        P.load_hub(folder)
    assert not marker.exists(), "decided before the module's body ran"
    assert name not in sys.modules
    [ev] = P.of(events, "import")
    assert ev["target"] == name and ev["decision"] == "blocked"
    assert ev["chain"][0]["loader"] == "torch.hub.load" and ev["chain"][0]["artifact"] == folder
    assert ev["origin"]["file"] == os.path.join(folder, "hubconf.py") and ev["origin"]["line"] == 2
    assert ev["detail"]["file"] == str(outside / f"{name}.py")
    assert f"- '{name}'" in ev["allowlist"] and isinstance(info.value, PermissionError)


def test_import_at_inference_blocked(guard, tmp_path, outside, marker):
    name = P.payload_module(outside, marker)
    events = guard()
    model = P.load_hub(hub_importing(tmp_path, name, where="forward"))
    with pytest.raises(tmtguard.ImportViolation):
        P.infer(model)
    assert not marker.exists()
    [ev] = P.of(events, "import")
    assert ev["origin"]["function"] == "forward"


def test_import_audited(guard, tmp_path, outside, marker):
    name = P.payload_module(outside, marker)
    events = guard(mode="audit")
    P.load_hub(hub_importing(tmp_path, name))
    assert marker.exists()
    [ev] = P.of(events, "import")
    assert ev["decision"] == "audited" and ev["target"] == name


def test_import_permitted_by_imports_allow(guard, tmp_path, outside, marker):
    name = P.payload_module(outside, marker)
    rules = write_allowlist(tmp_path / "i.yaml", f"version: 1\nimports:\n  allow: [{name}]\n"
                                                 f"files:\n  allow: [{str(marker)!r}]\n")
    events = guard(allowlists=[rules])
    P.load_hub(hub_importing(tmp_path, name))
    assert marker.exists() and events == []


def test_application_imports_untouched(guard, tmp_path, outside, marker):
    name = P.payload_module(outside, marker)
    events = guard()
    P.load_hub(P.hub_folder(tmp_path, "pass"))  # model code exists in the process
    importlib.import_module(name)
    assert marker.exists() and events == []
    assert sys.meta_path[0] is import_guard.finder


def test_model_folder_modules_are_model_code(guard, tmp_path, marker):
    # hubconf imports its sibling module: allowed (the artifact's own code) and registered as model code
    folder = P.hub_folder(tmp_path, "helper_mod.act(x)", net_imports="import helper_mod", files={
        "helper_mod.py": f"import os\n\ndef act(x):\n    os.system('touch {marker}')\n"})
    events = guard()
    model = P.load_hub(folder)
    with pytest.raises(tmtguard.ProcessViolation):
        P.infer(model)
    [ev] = P.of(events, "process.spawn")
    assert ev["origin"]["file"] == os.path.join(os.path.realpath(folder), "helper_mod.py")
    assert not P.of(events, "import")


def test_pickle_calling_import_module_is_decided(guard, tmp_path, outside, marker):
    name = P.payload_module(outside, marker)
    data = A.dumps(A.call(A.glob("importlib", "import_module"), name))
    events = guard(allowlists=[write_allowlist(tmp_path / "p.yaml", "version: 1\npickle:\n  allow: ['importlib:import_module']\n")])
    with pytest.raises(tmtguard.ImportViolation):
        pickle.loads(data)
    assert not marker.exists()
    [ev] = P.of(events, "import")
    assert ev["chain"][0]["loader"] == "pickle.loads" and ev["origin"]["file"] == __file__


def test_pickle_global_import_follows_the_pickle_allowlist(guard, tmp_path, outside, marker):
    # pickle.allow naming module:VALUE implies importing that module: the pickle guard decided it
    name = P.payload_module(outside, marker)
    rules = write_allowlist(tmp_path / "p.yaml", f"version: 1\npickle:\n  allow: ['{name}:VALUE']\n"
                                                 f"files:\n  allow: [{str(marker)!r}]\n")
    events = guard(allowlists=[rules])
    assert pickle.loads(A.dumps(A.glob(name, "VALUE"))) == 1
    assert not P.of(events, "import")


def test_spec_from_file_location_by_model_code_is_decided(guard, tmp_path, outside, marker):
    name = P.payload_module(outside, marker)
    path = str(outside / f"{name}.py")
    folder = P.hub_folder(tmp_path, f"""
        spec = importlib.util.spec_from_file_location("sideload", {path!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    """, net_imports="import importlib.util")
    events = guard()
    with pytest.raises(tmtguard.ImportViolation):
        P.infer(P.load_hub(folder))
    assert not marker.exists()
    assert P.of(events, "import")[0]["target"] == "sideload"


def test_find_spec_probes_are_not_refused(guard, tmp_path, outside, marker):
    name = P.payload_module(outside, marker)
    folder = P.hub_folder(tmp_path, f"assert importlib.util.find_spec({name!r}) is not None",
                          net_imports="import importlib.util")
    events = guard()
    P.infer(P.load_hub(folder))
    assert not marker.exists() and events == []


def test_native_extension_in_a_model_folder_is_a_native_load(guard, tmp_path):
    folder = P.hub_folder(tmp_path, "pass", hubconf_body="import fastops")
    src = os.path.join(sysconfig.get_paths()["platstdlib"], "lib-dynload", "_json" + sysconfig.get_config_var("EXT_SUFFIX"))
    shutil.copy(src, os.path.join(folder, "fastops" + sysconfig.get_config_var("EXT_SUFFIX")))
    events = guard()
    with pytest.raises(tmtguard.NativeViolation):
        P.load_hub(folder)
    [ev] = P.of(events, "native.load")
    assert ev["target"].endswith("fastops" + sysconfig.get_config_var("EXT_SUFFIX"))


def test_blocked_import_inside_a_guarded_load(guard, tmp_path, outside, marker):
    name = P.payload_module(outside, marker)
    events = guard()
    with tmtguard.guarded_load("custom.load", str(tmp_path / "model.bin")):
        with pytest.raises(tmtguard.ImportViolation):
            importlib.import_module(name)
        import json  # noqa: F401  (already imported: nothing to decide)
        import csv  # noqa: F401  (stdlib: the built-in list)
    assert not marker.exists()
    assert [e["target"] for e in events] == [name]


def test_installed_distribution_imports_its_dependencies(tmp_path):
    # requests is allowed; the modules it imports (urllib3, idna, certifi, charset_normalizer) are its
    # declared dependencies; a module it does not declare is still refused. Fresh interpreter: a clean
    # sys.modules.
    rules = write_allowlist(tmp_path / "r.yaml", "version: 1\nimports:\n  allow: ['requests.*']\n")
    code = (
        "import sys, tmtguard\n"
        "assert 'urllib3' not in sys.modules and 'hypothesis' not in sys.modules\n"
        "with tmtguard.guarded_load('custom.load', 'model.bin'):\n"
        "    import requests\n"
        "    try:\n"
        "        import hypothesis\n"
        "    except tmtguard.ImportViolation:\n"
        "        print('HYPOTHESIS BLOCKED')\n"
        "print('urllib3' in sys.modules, 'idna' in sys.modules, 'certifi' in sys.modules)\n"
    )
    proc = run_python(code, cwd=tmp_path, env=subprocess_env(TMTGUARD_MODE="enforce", TMTGUARD_ALLOWLIST=str(rules)))
    assert proc.returncode == 0, proc.stderr
    assert "True True True" in proc.stdout and "HYPOTHESIS BLOCKED" in proc.stdout, proc.stdout + proc.stderr


def test_process_wide_imports(guard, tmp_path, outside, marker):
    name = P.payload_module(outside, marker)
    guard(process_wide=True)
    try:
        with pytest.raises(tmtguard.ImportViolation, match="application code"):
            importlib.import_module(name)
    finally:
        guard()
    assert not marker.exists()
