"""A server's first remote-code load, with nothing of the modeling stack imported beforehand: the
frameworks' own start-up (torch.distributed dlopens libc, mpmath generates code, torch imports an
optional colorama) is theirs, while an untrusted package imported by model code stays checked."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import hubfixtures as hf
from conftest import subprocess_env

pytest.importorskip("transformers")


def test_cold_first_remote_code_load_in_enforce(tmp_path):
    cache, modules = tmp_path / "hub", tmp_path / "modules"
    hf.tiny_custom_model(str(cache), "acme/cold", code_repo="other/coldcode")
    env = subprocess_env(**hf.env_for(str(cache), str(modules)))
    pin = subprocess.run([sys.executable, "-m", "tmtguard", "pin", "acme/cold", "--cache-dir", str(cache)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert pin.returncode == 0, pin.stderr
    (tmp_path / "allow.yaml").write_text(pin.stdout)
    events = tmp_path / "events.jsonl"
    env.update(TMTGUARD_MODE="enforce", TMTGUARD_ALLOWLIST=str(tmp_path / "allow.yaml"), TMTGUARD_EVENTS=str(events))
    code = ("import torch\nfrom transformers import AutoModel\n"
            "m = AutoModel.from_pretrained('acme/cold', trust_remote_code=True)\n"
            "print('LOADED', type(m).__name__, tuple(m(torch.ones(1, 4)).shape))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED TinyModel (1, 2)" in out.stdout
    recorded = [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []
    assert recorded == [], recorded
