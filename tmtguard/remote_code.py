"""Hugging Face remote code: which repo, commit and file a piece of it is, and whether the
``remote_code.allow`` rules permit it.

Shared by the transformers guard (``guards/transformers.py``) and ``tmtguard pin``. Imports neither
transformers nor huggingface_hub; the only I/O is hashing the (small) code files, cached by
provenance's (device, inode, size, mtime) digest cache.

Identity:

* a hub file lives in a snapshot, ``<cache>/models--<org>--<name>/snapshots/<commit>/<file>``: its repo
  is ``org/name``, its revision the 40-hex commit, its file the posix path inside the snapshot;
* a local folder (``from_pretrained("./dir", trust_remote_code=True)``) is its real path; as it has no
  commit, its revision is :func:`local_revision`, a sha1 over the names and sha256 digests of every
  ``.py`` file in it (``tmtguard pin ./dir`` prints it), so that no code in it changes unnoticed.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass

from . import provenance

COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SNAPSHOT = re.compile(r"(?:^|/)(models|datasets|spaces)--([^/]+?)--([^/]+)/snapshots/([^/]+)/(.+)$")
# transformers' own patterns (dynamic_module_utils.get_relative_imports): `import .x`, `from .x import`
_RELATIVE = (re.compile(r"^\s*import\s+\.(\S+)\s*$", re.MULTILINE), re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE))


@dataclass(frozen=True)
class CodeFile:
    """One file of remote code, as tmtguard identifies it."""

    repo: str  # "org/name", or the real path of a local folder
    revision: str  # the 40-hex commit (hub) or local_revision() (folder); "" when unknown
    file: str  # posix path inside the repo: "modeling_x.py", "custom_generate/generate.py"
    path: str  # the snapshot (or folder) file: what the modules-cache copy must equal
    local: bool = False

    @property
    def target(self) -> str:
        return f"{self.repo}@{self.revision or '?'}/{self.file}"

    @property
    def root(self) -> str:
        """The snapshot folder (or local folder) the file is in."""
        depth = self.file.count("/") + 1
        root = self.path
        for _ in range(depth):
            root = os.path.dirname(root)
        return root


def hub_file(path: str) -> CodeFile | None:
    """The CodeFile of a file inside a hub-cache snapshot, or None when ``path`` is not in one."""
    m = _SNAPSHOT.search(os.path.abspath(path).replace(os.sep, "/"))
    if m is None:
        return None
    kind, org, name, revision, file = m.groups()
    repo = f"{org}/{name}" if kind == "models" else f"{kind}/{org}/{name}"
    return CodeFile(repo, revision, file, path)


def local_file(folder: str, path: str) -> CodeFile:
    folder = provenance.realpath(folder)
    real = provenance.realpath(path)
    rel = os.path.relpath(real, folder).replace(os.sep, "/")
    if rel.startswith("../"):  # a symlink out of the folder: name it by the link, not the target
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(folder)).replace(os.sep, "/")
    return CodeFile(folder, local_revision(folder), rel, os.path.abspath(path), local=True)


def _python_files(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in filenames:
            if name.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/"))
    return sorted(out)


def local_revision(folder: str) -> str:
    """A local folder's code revision: sha1 over the sorted posix names and sha256 digests of every
    ``.py`` file under it (hidden folders and ``__pycache__`` skipped). 40 hex digits, like a commit."""
    h = hashlib.sha1(b"tmtguard-local-code-v1\n")
    for rel in _python_files(folder):
        digest = provenance.file_digest(os.path.join(folder, rel)) or "unreadable"
        h.update(f"{rel}\0{digest}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def relative_imports(path: str) -> list[str]:
    """Module names a code file imports relatively (``from .x import y``), as transformers finds them."""
    with provenance.internal():
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError):
            return []
    found = set()
    for pattern in _RELATIVE:
        found.update(pattern.findall(text))
    return sorted(found)


def closure(root: str, file: str) -> list[str]:
    """``file`` and every file it pulls in through relative imports, recursively (posix names inside
    ``root``), in the order transformers resolves them: the same files it copies and runs."""
    todo, seen = [file], []
    while todo:
        rel = todo.pop(0)
        if rel in seen:
            continue
        seen.append(rel)
        path = os.path.join(root, *rel.split("/"))
        base = posixpath.dirname(rel)
        for name in relative_imports(path):
            todo.append(posixpath.join(base, name) + ".py" if base else name + ".py")
    return seen


def parse_ref(ref: str, model: str) -> tuple[str, str, str] | None:
    """An ``auto_map`` value (``"other/repo--module.Class"`` or ``"module.Class"``) -> (code repo,
    module file, class name); None when it is not a class reference."""
    if not isinstance(ref, str) or "." not in ref:
        return None
    repo = model
    if "--" in ref:
        repo, ref = ref.split("--", 1)
    module, _, cls = ref.rpartition(".")
    if not module or not cls:
        return None
    return repo, module + ".py", cls


# --- matching (pure, given the digest) ----------------------------------------------------------


def _same_repo(rule_repo: str, code: CodeFile) -> bool:
    if not code.local:
        return rule_repo == code.repo
    if not (rule_repo.startswith(("/", "~", ".")) or os.path.isabs(rule_repo)):
        return False
    return provenance.realpath(os.path.expanduser(rule_repo)) == code.repo


def index_by_repo(rules) -> dict:
    """{repo: [rules naming it, in order]}: built once per policy (Policy.refresh), so that a
    deployment pinning hundreds of repos does not scan them all for every code file."""
    index: dict = {}
    for r in rules:
        index.setdefault(r.repo, []).append(r)
    return index


def match(rules, code: CodeFile, digest: str | None, by_repo: dict | None = None):
    """(Source, "") of the rule permitting ``code`` with ``digest``, else (None, why not).
    ``by_repo``: :func:`index_by_repo` of ``rules`` (hub repos are then a dict lookup; local folders,
    matched on their real path, are always scanned)."""
    if by_repo is not None and not code.local:
        named = by_repo.get(code.repo, [])
    else:
        named = [r for r in rules if _same_repo(r.repo, code)]
    if not named:
        return None, f"no remote_code.allow entry names {code.repo}"
    at = [r for r in named if code.revision and r.revision == code.revision]
    if not at:
        revs = ", ".join(sorted({r.revision for r in named}))
        return None, (f"remote_code.allow names {code.repo} only at {revs} ({named[0].source}); "
                      f"this code is at {code.revision or 'an unknown revision'}")
    reasons = []
    for rule in at:
        if not rule.files:
            return rule.source, ""
        pinned = rule.pinned.get(code.file)
        if pinned is None:
            reasons.append(f"the entry for {code.repo}@{code.revision} ({rule.source}) lists "
                           f"{', '.join(n for n, _ in rule.files)}, not {code.file}")
        elif pinned == digest:
            return rule.source, ""
        else:
            reasons.append(f"{code.file} has sha256 {digest or 'unknown'}, but {rule.source} pins {pinned}")
    return None, "; ".join(reasons)


def repo_allowed(rules, repo: str, revision: str, local: bool = False):
    """The Source of a rule naming ``repo`` at ``revision`` (whatever files it lists), else None."""
    probe = CodeFile(repo, revision, "", "", local)
    for rule in rules:
        if _same_repo(rule.repo, probe) and rule.revision == revision:
            return rule.source
    return None


# --- allowlist text ----------------------------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./+-]*$")


def _scalar(value: str) -> str:
    return value if _PLAIN.match(value) and value not in ("true", "false", "null", "yes", "no", "on", "off") \
        else json.dumps(value)


def entry_lines(repo: str, revision: str, files: dict, indent: str = "    ") -> list[str]:
    """One ``remote_code.allow`` list item (YAML lines): repo, revision and ``files`` (name -> hex)."""
    lines = [f"{indent}- repo: {_scalar(repo)}", f"{indent}  revision: {_scalar(revision)}"]
    if files:
        lines.append(f"{indent}  files:")
        lines.extend(f"{indent}    {_scalar(name)}: sha256:{files[name]}" for name in sorted(files))
    return lines


def allowlist_text(entries: list[tuple[str, str, dict]], *, header: list[str] = ()) -> str:
    """A whole allowlist document with these ``remote_code.allow`` entries (parsed by policy.parse)."""
    lines = [f"# {h}" if h else "#" for h in header]
    lines += ["version: 1", "remote_code:", "  allow:"]
    for repo, revision, files in entries:
        lines += entry_lines(repo, revision, files)
    return "\n".join(lines) + "\n"


def suggestion(code: CodeFile) -> str:
    """The allowlist lines that would permit ``code`` and the files it pulls in relatively."""
    files = {}
    for rel in closure(code.root, code.file):
        digest = provenance.file_digest(os.path.join(code.root, *rel.split("/")))
        if digest:
            files[rel] = digest
    return "\n".join(["remote_code:", "  allow:"] + entry_lines(code.repo, code.revision, files))
