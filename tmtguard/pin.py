"""``tmtguard pin MODEL``: the ``remote_code.allow`` entries a model needs, for review.

Resolves MODEL in the local Hugging Face cache (``org/name`` at ``--revision``, default ``main``) or
as a folder, reads the ``auto_map`` of every JSON file at its top (config.json, tokenizer_config.json,
processor and preprocessor configs...), follows each class reference to the repo that holds the code
(``other/repo--module.Class`` is read at that repo's ``main``, as transformers does) and hashes every
file that would run: the module and, recursively, its relative imports. A ``custom_generate/generate.py``
is included too. Nothing is downloaded and no code is run; transformers is not imported.
"""
from __future__ import annotations

import json
import os
import sys

from . import provenance, remote_code


class PinError(Exception):
    """The model, or a repo its auto_map names, cannot be found in the local cache."""


def _hub_cache(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return env["HF_HUB_CACHE"]
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")


def _snapshot(cache: str, repo: str, revision: str | None) -> tuple[str, str]:
    """(commit, snapshot folder) of ``repo`` at ``revision`` in the hub cache."""
    folder = os.path.join(cache, "models--" + repo.replace("/", "--"))
    rev = revision or "main"
    if remote_code.COMMIT.match(rev):
        commit = rev
    else:
        try:
            with open(os.path.join(folder, "refs", rev), encoding="utf-8") as fh:
                commit = fh.read().strip()
        except OSError:
            raise PinError(f"{repo} at {rev!r} is not in the local cache ({cache}); download it first "
                           f"(huggingface-cli download {repo} --revision {rev})") from None
    snap = os.path.join(folder, "snapshots", commit)
    if not os.path.isdir(snap):
        raise PinError(f"{repo}@{commit} has no snapshot in the local cache ({snap})")
    return commit, snap


def _refs_in(folder: str) -> list[str]:
    """Every class reference in the auto_map of the JSON files at the top of ``folder``."""
    refs = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        amap = data.get("auto_map") if isinstance(data, dict) else None
        if not isinstance(amap, dict):
            continue
        for value in amap.values():
            for ref in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(ref, str) and ref not in refs:
                    refs.append(ref)
    return refs


def pin(model: str, revision: str | None = None, cache_dir: str | None = None) -> list[tuple[str, str, dict]]:
    """[(repo, revision, {file: sha256})] for every repo MODEL pulls code from, its own first."""
    cache = _hub_cache(cache_dir)
    local = os.path.isdir(model)
    if local:
        root = os.path.realpath(model)
        home = (root, remote_code.local_revision(root), root)
    else:
        commit, root = _snapshot(cache, model, revision)
        home = (model, commit, root)
    wanted: dict = {}  # (repo, revision, root) -> set of files

    def want(where, file):
        repo_, rev_, root_ = where
        path = os.path.join(root_, *file.split("/"))
        if not os.path.isfile(path):
            raise PinError(f"{repo_}@{rev_} has no {file} (named by the auto_map of {model})")
        wanted.setdefault(where, set()).update(remote_code.closure(root_, file))

    for ref in _refs_in(root):
        parsed = remote_code.parse_ref(ref, model)
        if parsed is None:
            continue
        repo, module_file, _cls = parsed
        if "--" not in ref:
            where = home
        elif os.path.isdir(repo):
            folder = os.path.realpath(repo)
            where = (folder, remote_code.local_revision(folder), folder)
        else:
            commit, snap = _snapshot(cache, repo, None)  # transformers reads another repo's code at main
            where = (repo, commit, snap)
        want(where, module_file)
    if os.path.isfile(os.path.join(root, "custom_generate", "generate.py")):
        want(home, "custom_generate/generate.py")
    out = []
    for (repo, rev, folder), files in sorted(wanted.items(), key=lambda kv: (kv[0] != home, kv[0][0])):
        digests = {}
        for file in sorted(files):
            path = os.path.join(folder, *file.split("/"))
            if not os.path.isfile(path):
                raise PinError(f"{repo}@{rev}: {file} is imported relatively but is not in the snapshot")
            digests[file] = provenance.file_digest(path)
        out.append((repo, rev, digests))
    return out


def render(model: str, entries: list, revision: str | None = None) -> str:
    header = [f"tmtguard pin {model}" + (f" --revision {revision}" if revision else ""),
              "The remote code from_pretrained(..., trust_remote_code=True) would run. Read it before you allow it:"]
    header += [f"  {repo}@{rev}: {', '.join(sorted(files))}" for repo, rev, files in entries]
    if not entries:
        header.append("  (none: this model names no remote code)")
        return "\n".join(f"# {h}" for h in header) + "\nversion: 1\n"
    return remote_code.allowlist_text(entries, header=header)


def main(model: str, revision: str | None, cache_dir: str | None, output: str | None) -> int:
    try:
        entries = pin(model, revision, cache_dir)
    except PinError as exc:
        print(f"tmtguard pin: {exc}", file=sys.stderr)
        return 1
    text = render(model, entries, revision)
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    n = sum(len(f) for _, _, f in entries)
    print(f"# {len(entries)} repo(s), {n} file(s) pinned" + (f"; written to {output}" if output else ""), file=sys.stderr)
    return 0
