"""The policy: merged allowlists and pure matching. No patching, no sinks; the only I/O is reading
allowlist files when a policy is built, and asking a frame for its digest when a rule pins one."""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

from .schema import (  # noqa: F401  (re-exported for tools and tests)
    AllowlistError,
    AllowlistFile,
    ArtifactMatch,
    NetRule,
    RemoteCodeRule,
    Scoped,
    Section,
    Source,
    load_file,
    parse,
    parse_net_rule,
)

# Names that run code, spawn processes, touch files or the network when a pickle calls them. A hint
# never tells a user to allowlist these without saying so, and `tmtguard learn` never proposes them.
CODE_RUNNING_MODULES = frozenset(
    """os posix nt subprocess pty commands popen2 runpy builtins __builtin__ importlib imp pkgutil
    code codeop pdb bdb profile cProfile trace timeit doctest pydoc webbrowser shutil socket ssl
    http urllib requests httpx ctypes cffi marshal pickle _pickle dill cloudpickle shelve types
    operator functools sys multiprocessing asyncio threading signal tempfile glob io _io
    numpy.testing torch.jit torch.hub torch.package torch.utils.cpp_extension torch.serialization""".split()
)
SAFE_BUILTINS = frozenset(
    """set frozenset list dict tuple bytearray bytes str int float complex bool slice range object
    NoneType Ellipsis NotImplemented""".split()
)


def can_run_code(module: str, qualname: str) -> bool:
    """True when a pickle naming module:qualname could run code or reach the outside world."""
    if module in ("builtins", "__builtin__"):
        return qualname not in SAFE_BUILTINS
    root = module
    while True:
        if root in CODE_RUNNING_MODULES:
            return True
        if "." not in root:
            break
        root = root.rpartition(".")[0]
    return "." in qualname or qualname.startswith("_") and "rebuild" not in qualname


def builtin_allowlist_files() -> list[str]:
    """The built-in allowlists: shipped inside the wheel, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent.parent
    for folder in (here / "allowlists", here.parent / "allowlists"):
        if folder.is_dir():
            return sorted(str(p) for p in folder.glob("*.yaml"))
    return []


@dataclass
class Policy:
    """The effective policy: every layer merged. Allowlists only ever widen what is permitted."""

    files: tuple = ()
    base: Section = field(default_factory=Section)
    scoped: list = field(default_factory=list)
    remote_code: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        # The hot paths read these: a frozenset lookup is all an allowed pickle global costs.
        self.pickle_base = frozenset(self.base.pickle)
        # Built-in pairs are inert data types: the pickle guard allows them without even materializing
        # the chain. A pair only your allowlist names (your own class, a nested loader) takes the
        # slower path, so that what it does during the load is attributed to the load.
        builtin = set(builtin_allowlist_files())
        self.pickle_inert = frozenset(k for k, src in self.base.pickle.items()
                                      if src.file in builtin and not _acts(k))
        self.import_exact = frozenset(k for k in self.base.imports if not k.endswith(".*"))
        # modules code.allow names exactly, for every chain: the code guard's first test
        self.code_exact = frozenset(k for k in self.base.code if not k.endswith(".*"))
        self.import_prefixes = tuple(k[:-1] for k in self.base.imports if k.endswith(".*"))
        self.has_scopes = bool(self.scoped)
        from ..remote_code import index_by_repo

        self.remote_code_by_repo = index_by_repo(self.remote_code)

    # -- building --------------------------------------------------------------------------

    @classmethod
    def from_files(cls, paths, *, builtins: bool = True) -> "Policy":
        layers = (builtin_allowlist_files() if builtins else []) + [str(p) for p in paths]
        return cls.merge([load_file(p) for p in layers])

    @classmethod
    def merge(cls, parsed: list) -> "Policy":
        base = Section()
        scoped: list = []
        remote: list = []
        for af in parsed:
            _widen(base, af.base)
            scoped.extend(af.scoped)
            remote.extend(af.remote_code)
        return cls(tuple(af.path for af in parsed), base, scoped, remote)

    # -- matching (pure) -------------------------------------------------------------------

    def sections_for(self, chain) -> list:
        """Scoped sections that apply: those whose match names the innermost artifact of the chain.
        An outer artifact's scoped permissions never extend to what it loads."""
        if not self.scoped or not chain:
            return []
        frame = chain[-1]
        return [s.section for s in self.scoped if artifact_matches(s.match, frame)]

    def pickle_allowed(self, module: str, qualname: str, chain) -> Source | None:
        key = (module, qualname)
        src = self.base.pickle.get(key)
        if src is not None:
            return src
        for section in self.sections_for(chain):
            src = section.pickle.get(key)
            if src is not None:
                return src
        return None

    def import_allowed(self, module: str, chain) -> Source | None:
        for section in [self.base] + self.sections_for(chain):
            src = _module_match(section.imports, module)
            if src is not None:
                return src
        return None

    def code_allowed(self, module: str, chain) -> Source | None:
        for section in [self.base] + self.sections_for(chain):
            src = _module_match(section.code, module)
            if src is not None:
                return src
        return None

    def network_allowed(self, host: str, port, chain) -> Source | None:
        for section in [self.base] + self.sections_for(chain):
            for rule, src in section.network.items():
                if rule.matches(host, port):
                    return src
        return None

    def network_name_allowed(self, host: str, chain) -> Source | None:
        """A rule naming ``host`` on some port: what a name lookup that names no port needs."""
        for section in [self.base] + self.sections_for(chain):
            for rule, src in section.network.items():
                if rule.matches_host(host):
                    return src
        return None

    def network_rules(self, chain) -> list:
        """Every (NetRule, Source) that applies to ``chain``, for a refusal to say what is allowed."""
        return [(rule, src) for section in [self.base] + self.sections_for(chain) for rule, src in section.network.items()]

    def process_allowed(self, executable: str, chain) -> Source | None:
        name = os.path.basename(executable)
        for section in [self.base] + self.sections_for(chain):
            for allowed, src in section.process.items():
                if executable == allowed or ("/" not in allowed and name == allowed):
                    return src
        return None

    def file_allowed(self, path: str, chain) -> Source | None:
        for section in [self.base] + self.sections_for(chain):
            for pattern, src in section.files.items():
                if path_matches(pattern, path):
                    return src
        return None

    def native_allowed(self, library: str, symbol: str | None, chain) -> Source | None:
        """A library load (``symbol`` None) or a symbol lookup. ``native.allow`` entries: ``LIB`` (load it,
        look up anything in it) or ``LIB:SYMBOL`` (load it, look up that symbol); LIB is a path, a file
        name or a glob, ``<process>`` for the program itself (``ctypes.CDLL(None)``)."""
        name = os.path.basename(library)
        for section in [self.base] + self.sections_for(chain):
            for entry, src in section.native.items():
                lib, sep, sym = entry.rpartition(":")
                if not sep:
                    lib, sym = entry, None
                if "/" in lib:
                    if not fnmatch.fnmatchcase(library, lib):
                        continue
                elif not fnmatch.fnmatchcase(name, lib):
                    continue
                if symbol is None or sym is None or sym == symbol:
                    return src
        return None

    @property
    def network_process_wide(self) -> bool:
        return bool(self.base.network_process_wide)

    def describe_sources(self) -> str:
        # On every refusal: computed once per policy (listing the built-in folder is a glob and a
        # realpath, and was done once per file; it was most of a refusal's cost).
        text = self.__dict__.get("_described")
        if text is None:
            names = set(builtin_allowlist_files())
            builtin = [f for f in self.files if f in names]
            user = [f for f in self.files if f not in names]
            text = f"built-in ({len(builtin)} files)" + (f", {', '.join(user)}" if user else "; no allowlist of yours")
            self.__dict__["_described"] = text
        return text


# Built-in pairs that are safe to name but ACT when rebuilt: they connect (a DataLoader worker's fd
# hand-over), open shared memory, read arrays from files, or load a nested pickle. Allowed, but never
# on the guard's no-frame fast path: deciding them materializes the load's frame, so that the
# connect or read that follows is checked against the load (a forged DupFd connects anywhere).
ACTING_BUILTIN_MODULES = ("torch.multiprocessing.reductions", "multiprocessing.resource_sharer", "joblib.",
                          "torch.storage")


def _acts(pair) -> bool:
    module = pair[0]
    return any(module == m or module.startswith(m if m.endswith(".") else m + ".") for m in ACTING_BUILTIN_MODULES)


def _widen(into: Section, more: Section) -> None:
    for name in ("pickle", "imports", "network", "process", "files", "code", "native"):
        target = getattr(into, name)
        for key, src in getattr(more, name).items():
            target.setdefault(key, src)
    if more.network_process_wide is not None:
        into.network_process_wide = bool(into.network_process_wide) or more.network_process_wide


def _module_match(table: dict, module: str) -> Source | None:
    src = table.get(module)
    if src is not None:
        return src
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        src = table.get(".".join(parts[:i]) + ".*")
        if src is not None:
            return src
    return None


def path_matches(pattern: str, path: str) -> bool:
    """A pattern names a file, a folder (everything below it) or a glob (``*`` crosses ``/``)."""
    pattern = os.path.expanduser(pattern)
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(path, pattern)
    pattern = pattern.rstrip("/") or "/"
    return path == pattern or path.startswith(pattern if pattern.endswith("/") else pattern + "/")


def artifact_matches(match: ArtifactMatch, frame) -> bool:
    if match.repo is not None and getattr(frame, "repo", None) != match.repo:
        return False
    if match.path is not None:
        path = getattr(frame, "path", None)
        if path is None or not path_matches(match.path, path):
            return False
    if match.sha256 is not None and frame.digest() != match.sha256:
        return False
    return True


def suggestion(section: str, entry: str, frame=None, *, digest: str | None = None) -> str:
    """The allowlist lines that would permit an action: globally, and scoped to the artifact."""
    if section == "pickle":
        from .schema import PICKLE_REF

        if not PICKLE_REF.fullmatch(entry):
            # No allowlist can name it; and a pickle's raw text (a newline in a STACK_GLOBAL name)
            # must never reach the refusal message or the log as lines of its own.
            return None
    lines = [f"{section}:", "  allow:", f"    - {entry!r}" if section != "pickle" else f"    - {entry}"]
    text = "\n".join(lines)
    if frame is not None:
        if digest:
            match = f"sha256: {digest}"
        elif getattr(frame, "repo", None):
            match = f"repo: {frame.repo}"
        elif getattr(frame, "path", None):
            match = f"path: {frame.path!r}"
        else:
            match = None
        if match:
            # network entries can start with '*' or '[' (YAML syntax): quote them
            item = repr(entry) if section == "network" else entry
            scoped = ["artifacts:", f"  - match: {{{match}}}", f"    {section}:", "      allow:", f"        - {item}"]
            text += "\n# or, only for this artifact:\n" + "\n".join(scoped)
    return text
