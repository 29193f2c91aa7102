"""`tmtguard demo`, the first Quick start command, end to end."""
from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import subprocess_env


def test_demo_blocks_the_nested_payload_and_names_both_artifacts(tmp_path):
    cmd = [shutil.which("tmtguard") or "", "demo"] if shutil.which("tmtguard") else [sys.executable, "-m", "tmtguard", "demo"]
    out = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "1. benign checkpoint benign.pt: loaded" in text
    assert "2. malicious checkpoint model.pt: refused." in text
    assert "tmtguard blocked pickle.global 'posix:system'" in text
    assert "chain: torch.load(" in text and "model.pt" in text and "-> torch.load(<bytes:" in text
    assert "not written: the payload never ran" in text


def test_demo_without_torch_uses_plain_pickle_artifacts(tmp_path):
    # Hide torch from the interpreter: the demo must still show a nested chain being caught.
    (tmp_path / "torch.py").write_text("raise ImportError('torch hidden for this test')\n")
    env = subprocess_env()
    env["PYTHONPATH"] = str(tmp_path) + ":" + env["PYTHONPATH"]
    out = subprocess.run([sys.executable, "-m", "tmtguard", "demo"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(pickle artifacts" in out.stdout
    assert "-> pickle.loads(<bytes:" in out.stdout and "not written" in out.stdout
