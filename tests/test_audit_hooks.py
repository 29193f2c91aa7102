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
