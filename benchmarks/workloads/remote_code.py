"""AutoModel.from_pretrained(trust_remote_code=True) of a tiny custom model from an offline hub cache.

The cache is built by tests/hubfixtures.py (``tiny_custom_model`` + ``env_for``), written by another
part of the project. Until that file exists this workload is a clearly marked stub: ``prepare``
raises NotAvailable and the table says "not yet available".

Every timed repetition loads a DIFFERENT repo (bench/tiny-remote-<i>, each with its own model_type),
so each one takes the cold remote-code path a server takes once per model: check_imports, the copy
into HF_MODULES_CACHE, exec of configuration/modeling code, model construction, safetensors load.
HF_MODULES_CACHE is a fresh empty folder per process so every process does the same work.
Guarded runs get TMTGUARD_ALLOWLIST pointing at an allowlist that pins every bench repo (commit +
sha256 of each code file), as a deployment that allows these models would; without it enforce
refuses the code (RemoteCodeViolation), which is correct but not a timing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from benchmarks.workloads import NotAvailable

NAME = "remote_code"
TITLE = "AutoModel.from_pretrained(trust_remote_code=True), tiny custom model, offline hub cache"
BUDGET = 1.05  # the from_pretrained budget, applied to the remote-code variant too
PEERS = ()
REPS = 20
QUICK_REPS = 8
KIND = "inprocess"

N_REPOS = REPS + 1  # one per timed repetition + the warm-up
FIXTURE_VERSION = 1


def _hubfixtures():
    from benchmarks._common import REPO_ROOT

    path = REPO_ROOT / "tests" / "hubfixtures.py"
    if not path.exists():
        raise NotAvailable("tests/hubfixtures.py (offline hub cache builder) does not exist yet")
    spec = importlib.util.spec_from_file_location("_bench_hubfixtures", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:
        raise NotAvailable(f"tests/hubfixtures.py does not import: {type(exc).__name__}: {exc}")
    missing = [f for f in ("tiny_custom_model", "env_for") if not hasattr(mod, f)]
    if missing:
        raise NotAvailable(f"tests/hubfixtures.py has no {', '.join(missing)}")
    return mod


def _repo(i: int) -> str:
    return f"bench/tiny-remote-{i}"


def prepare(cache_dir: Path, n_repos: int = N_REPOS, folder: str = "hub") -> dict:
    """The offline hub cache with ``n_repos`` repos (benchmarks/remote_code_ab.py asks for more, in
    its own folder) and the allowlist pinning them."""
    hf = _hubfixtures()
    root = cache_dir / folder
    hub, modules = root / "hub-cache", root / "modules-unused"
    stamp, allowlist = root / "stamp.json", root / "tmtguard-allow.yaml"
    src_hash = hashlib.sha256(Path(hf.__file__).read_bytes()).hexdigest()
    want = {"version": FIXTURE_VERSION, "n": n_repos, "hubfixtures_sha256": src_hash}
    if not (stamp.exists() and allowlist.exists() and json.loads(stamp.read_text()) == want):
        shutil.rmtree(root, ignore_errors=True)
        # The guarded runs load code a deployment has reviewed and pinned: each repo at its commit,
        # each code file by sha256 (tmtguard's remote_code allowlist format, version 1).
        lines = ["version: 1", "remote_code:", "  allow:"]
        for i in range(n_repos):
            info = hf.tiny_custom_model(hub, repo_id=_repo(i), model_type=f"tmt-bench-{i}", seed=i)
            lines += [f"    - repo: {info['repo_id']}", f"      revision: {info['commit']}", "      files:"]
            for name, path in sorted(info["code_files"].items()):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                lines.append(f"        {name}: sha256:{digest}")
        allowlist.write_text("\n".join(lines) + "\n")
        stamp.write_text(json.dumps(want))
    env = hf.env_for(hub, modules)
    env.pop("HF_MODULES_CACHE", None)  # fresh per process, see fresh_dir_env
    return {
        "env": env,
        "fresh_dir_env": ["HF_MODULES_CACHE"],
        "guarded_env": {"TMTGUARD_ALLOWLIST": str(allowlist)},
        "n": n_repos,
    }


def setup(params: dict, config: str):
    if "HF_MODULES_CACHE" not in os.environ:
        raise RuntimeError("HF_MODULES_CACHE not set by the orchestrator")
    import torch  # noqa: F401
    from transformers import AutoModel

    # What the remote modules import (PreTrainedModel pulls in sympy/mpmath on first import), done
    # here like the from_pretrained workload imports modeling_bert: import cost is not what this
    # workload times, and the first repetition must not pay it.
    from transformers import PretrainedConfig, PreTrainedModel  # noqa: F401

    repos = iter(_repo(i) for i in range(params["n"]))

    def run():
        repo = next(repos)  # StopIteration if asked for more reps than repos
        model = AutoModel.from_pretrained(repo, trust_remote_code=True)
        assert type(model).__name__ == "TinyModel", type(model)

    return run
