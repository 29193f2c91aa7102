"""Shared fixtures. The suite imports the INSTALLED tmtguard (CI installs it with a plain pip install)."""
from __future__ import annotations

import os
import sys

# The suite controls tmtguard itself: an operator's TMTGUARD_* variables must not leak in.
for _name in [n for n in os.environ if n.startswith("TMTGUARD_")]:
    del os.environ[_name]

# TMTG_TEST_AUDIT_HOOK=python: run as a tmtguard built without a C compiler would (the Python audit
# hook); test_audit_hooks.py runs the guards' suites that way in a fresh interpreter.
_PYTHON_HOOK = os.environ.get("TMTG_TEST_AUDIT_HOOK") == "python"
if _PYTHON_HOOK:
    sys.modules["tmtguard._auditfast"] = None

import pytest  # noqa: E402

import tmtguard  # noqa: E402  (activates in enforce with the built-in allowlists)

if _PYTHON_HOOK:
    assert tmtguard.status()["audit_hook"] == "Python"

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def events():
    """Every event tmtguard emits during the test, as the dicts the sinks receive."""
    recorded: list = []
    tmtguard.add_sink(recorded.append)
    yield recorded
    tmtguard.remove_sink(recorded.append)


@pytest.fixture
def guard(events):
    """guard(mode="enforce", allowlists=[...]) -> the events list. Restores the default guard after."""

    def activate(mode: str = "enforce", allowlists=(), **kwargs):
        tmtguard.activate(mode=mode, allowlists=[str(a) for a in allowlists], **kwargs)
        return events

    activate()
    yield activate
    tmtguard.activate(mode="enforce", allowlists=[])


@pytest.fixture
def unguarded():
    """The guard switched off for the test (to show a payload really runs), then back on."""
    tmtguard.deactivate()
    yield
    tmtguard.activate(mode="enforce", allowlists=[])


@pytest.fixture
def marker(tmp_path):
    """Path a payload writes to; absent at the start."""
    path = tmp_path / "PWNED"
    assert not path.exists()
    return path


def write_allowlist(path, text: str):
    path.write_text(text)
    return path


def subprocess_env(**extra) -> dict:
    """Environment for a fresh interpreter: no TMTGUARD_* unless given, tests dir importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMTGUARD_")}
    env["PYTHONPATH"] = HERE + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(code: str, *, cwd, env=None, timeout=120):
    import subprocess

    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
