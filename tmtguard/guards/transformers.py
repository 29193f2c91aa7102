"""The transformers remote-code guard: ``trust_remote_code=True`` runs only pinned, allowlisted code.

Every remote-code path of transformers 5.x (configs, models, tokenizers, processors, feature
extractors, image and video processors, pipelines, ``custom_generate``) goes through four functions
of ``transformers.dynamic_module_utils``, which call one another through that module's globals:

    get_class_from_dynamic_module(class_ref, model)      "other/repo--module.Class": another repo
      -> get_cached_module_file(repo, "module.py")        resolve the snapshot file, then
           -> check_imports(snapshot file)                 import every top-level import (third-party
                                                           code runs HERE, before the file itself),
              copy to HF_MODULES_CACHE if missing, recurse into missing relative imports
      -> get_class_in_module(Class, copy)                 exec the COPY (spec_from_file_location)

The decision is taken in ``check_imports``, before any import, on the file that was resolved: its
repo, its commit (read from the snapshot path, so the ``main`` of a transitive repo is pinned to
what is really there), its name and its sha256 (``remote_code.allow``). ``get_cached_module_file``
notes which copy that decision is for, and ``get_class_in_module``, right before ``exec``, decides every
file the copy imports relatively (those it never fetched too), drops their cached bytecode and expects
each copy to compile from the bytes decided: the code guard hands the ``compile`` event of a copy to
``compiling`` (the bytes Python compiles are hashed: transformers never refreshes an existing hub
copy, so a modified one is refused) and the ``exec`` event of its module body to ``module_runs`` (a body
not compiled from verified bytes just before, i.e. from planted bytecode, is refused). Modules and
packages of the modules cache are checked as Python imports them (``cache_module``, called by the import
guard): a package ``__init__`` must be the empty file transformers creates, a module a planned copy or
an unchanged copy of the snapshot file of its name (``from . import x``, which transformers does not
fetch), never an extension module. Each file is then model code (``provenance.register_model_code``) with the chain
``from_pretrained(org/model@commit) -> remote_code(other/repo@commit/modeling_x.py)``: its imports,
processes, files and network, at load and at inference, are checked by the other guards.

Patched where they are looked up: the module globals of ``dynamic_module_utils`` (wrapt post-import
hook, so tmtguard never imports transformers itself) and every module that bound them by name
(``auto_factory``, ``configuration_auto``, ... ``pipelines``, ``generation.utils``, and any other found
holding the originals). A module imported later binds the replacements, since it imports
``dynamic_module_utils`` first. If those internals no longer look as this guard expects, the hook
fails loudly: ``GuardError`` in enforce (the import of transformers' auto classes fails), an event in
audit.

The auto classes' ``from_pretrained`` / ``from_config`` only note which model is being loaded (the
head of the chain): the frame is pushed while that model's code is checked and run, not around the
whole load, so that transformers' own downloads, token and cache files are not policed as the
model's. They also close the re-registration gap: a class registered from one repo's code that a
registry hands to another load (``AutoModel.register``, ``AutoConfig.register``) is decided like the
code that load declares.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import posixpath
import stat
import sys
import threading
import types
from contextvars import ContextVar
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import wrapt

from .. import decision, provenance, remote_code
from ..decision import RemoteCodeViolation

DMU = "transformers.dynamic_module_utils"
ACTION = "remote_code.load"
DYNAMIC_PREFIX = "transformers_modules."

# dynamic_module_utils functions replaced, with the parameters the replacements rely on, and the
# names each must look up at call time (module globals) for the replacements to be reached.
EXPECTED = {
    "get_class_from_dynamic_module": (("class_reference", "pretrained_model_name_or_path"),
                                      ("get_cached_module_file", "get_class_in_module")),
    "get_cached_module_file": (("pretrained_model_name_or_path", "module_file"), ("check_imports",)),
    "check_imports": (("filename",), ("import_module",)),
    "get_class_in_module": (("class_name", "module_path"), ("exec_module", "HF_MODULES_CACHE")),
}
# Names that import or run code: in dynamic_module_utils only these functions may use them.
CODE_RUNNING = {"exec_module": "get_class_in_module", "spec_from_file_location": "get_class_in_module",
                "module_from_spec": "get_class_in_module", "import_module": "check_imports",
                "exec": None, "eval": None, "load_module": None, "run_path": None, "run_module": None}

# Where the auto classes are (context only: which model is loaded, which auto class asked).
ENTRY_POINTS = {
    "transformers.models.auto.auto_factory": (("_BaseAutoModelClass", "from_pretrained"),
                                              ("_BaseAutoModelClass", "from_config"),
                                              ("_BaseAutoBackboneClass", "from_pretrained")),
    "transformers.models.auto.configuration_auto": (("AutoConfig", "from_pretrained"),),
    "transformers.models.auto.tokenization_auto": (("AutoTokenizer", "from_pretrained"),),
    "transformers.models.auto.feature_extraction_auto": (("AutoFeatureExtractor", "from_pretrained"),),
    "transformers.models.auto.image_processing_auto": (("AutoImageProcessor", "from_pretrained"),),
    "transformers.models.auto.processing_auto": (("AutoProcessor", "from_pretrained"),),
    "transformers.models.auto.video_processing_auto": (("AutoVideoProcessor", "from_pretrained"),),
}
# Modules of transformers 5.x known to bind dynamic_module_utils functions by name (rebound here, and
# by the sweep of every loaded module when dynamic_module_utils is patched).
BINDING_SITES = tuple(ENTRY_POINTS) + ("transformers.pipelines", "transformers.generation.utils")

_on = False
_policy = None
_hooked = False
_patched: list = []  # (owner, attribute, original, replacement): restored by uninstall, kept by tamper.verify
_replacements: dict = {}  # id(original function) -> (original, replacement), one replacement per original

_decided: dict = {}  # real path of a modules-cache copy -> _Record it was decided as (its bytes checked as they compile)
_fetched: dict = {}  # a copy's path, as get_cached_module_file returned it -> _Record it was decided as
_planned = threading.local()  # files: (copy, its relative-import files) while get_class_in_module runs it
_origins: dict = {}  # class returned by get_class_in_module -> _Record of its file
# a modules-cache copy planned to run, by its path and by its real path -> (_Record its bytes must match,
# chain to refuse with): checked on the copy's compile event, each time Python compiles it (see
# compiling / module_runs)
_expected: dict = {}
_compiled: set = set()  # copies (as Python named them) compiled from verified bytes whose module body has not run yet
_cache_folders: dict = {}  # real folder of planned copies -> a _Record of a file in it (its repo, commit, root)
_relative_memo: dict = {}  # sha256 of a code file -> its relative imports (see _memo_relative_imports)


class _Record:
    __slots__ = ("code", "digest")

    def __init__(self, code, digest):
        self.code = code
        self.digest = digest


class _Load:
    """One from_pretrained / from_config / direct get_class_from_dynamic_module call: the model whose
    code may run (the head of the chain), resolved only when remote code is involved."""

    __slots__ = ("loader", "name", "revision", "cache_dir", "label", "path", "repo", "commit", "resolved",
                 "ref_read", "delivered", "checked", "spec")

    def __init__(self, loader, name, revision, cache_dir):
        self.loader = loader
        self.name = name
        self.revision = revision
        self.cache_dir = cache_dir
        self.resolved = self.ref_read = False
        self.label = self.path = self.repo = self.commit = self.spec = None
        self.delivered = set()  # classes the dynamic path handed this load
        self.checked = set()  # registry-served classes already decided for this load


class _Request:
    __slots__ = ("repo", "module_file", "record")

    def __init__(self, repo, module_file):
        self.repo = repo
        self.module_file = module_file
        self.record = None


_LOAD: ContextVar = ContextVar("tmtguard_hf_load", default=None)
_AUTO: ContextVar = ContextVar("tmtguard_hf_auto_class", default=None)
_REQUEST: ContextVar = ContextVar("tmtguard_hf_request", default=None)


# --- the head of the chain: the model being loaded ------------------------------------------------


def _hub_cache() -> str:
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and getattr(constants, "HF_HUB_CACHE", None):
        return constants.HF_HUB_CACHE
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~/.cache"), "huggingface")
    return os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")


def _hub_commit(repo: str, revision=None, cache_dir=None) -> str | None:
    """The commit ``revision`` (default ``main``) of ``repo`` names in the local hub cache, or None."""
    resolved = getattr(revision, "resolved", None)
    if isinstance(resolved, str) and remote_code.COMMIT.match(resolved):
        return resolved
    rev = str(revision) if revision else "main"
    if remote_code.COMMIT.match(rev):
        return rev
    ref = os.path.join(os.fspath(cache_dir) if cache_dir else _hub_cache(), "models--" + repo.replace("/", "--"), "refs", rev)
    with provenance.internal():
        try:  # open(2), read(2), close(2): no buffered text file (nor, from C, an audit event) for a ref
            got = provenance.read_small(ref, 4096)
            if got is None:
                return None
            commit = got.decode("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
    return commit if remote_code.COMMIT.match(commit) else None


def _resolve_kind(load: _Load) -> None:
    """Whether the load names a local folder (its real path) or a hub repo, once per load."""
    if not load.resolved:
        load.resolved = True
        name = os.fspath(load.name) if load.name is not None else None
        if not isinstance(name, str):
            load.label = "?"
        elif os.path.isdir(name):
            load.path = load.label = provenance.realpath(name)
        else:
            load.repo = load.label = name


def _resolve(load: _Load, code=None) -> None:
    """The load's kind and, for a hub repo, its commit: the one the model's own code file was resolved
    to when that is the code at hand (its snapshot folder), else what ``revision`` names in the hub
    cache's refs (read once)."""
    _resolve_kind(load)
    if load.commit is not None or load.repo is None:
        return
    own = code is not None and code.repo == load.repo and not code.local
    if own and remote_code.COMMIT.match(code.revision or ""):
        load.commit = code.revision  # the model's own code told us its commit
    else:
        if not load.ref_read:
            load.ref_read = True
            load.commit = _hub_commit(load.repo, load.revision, load.cache_dir)
        if load.commit is None and own and code.revision:
            load.commit = code.revision  # no ref to read: what its snapshot folder is named
    if load.commit:
        load.label = f"{load.repo}@{load.commit}"


def _head_spec(load: _Load | None, code=None):
    """The load's frame, as push_many takes it; final (and kept) once the load is a folder or its
    commit is known (_hub_commit reads the ref as tmtguard's own work)."""
    if load is None:
        return None
    if load.spec is not None:
        return load.spec
    _resolve(load, code)
    spec = (load.loader, load.label, load.path, load.repo, load.commit, None)
    if load.commit is not None or load.repo is None:
        load.spec = spec
    return spec


def _code_spec(code, digest):
    return ("remote_code", code.target, code.path, code.repo, code.revision or None, digest)


def _frame(spec) -> provenance.LoadFrame:
    loader, label, path, repo, revision, digest = spec
    return provenance.LoadFrame(loader, label, path=path, repo=repo, revision=revision, container=True, sha256=digest)


def _push(head, spec):
    """Push the load's frame (if any) and a code file's, for as long as the calling function runs (its
    frame is their entry); (frames, token) for provenance.pop_many. The callers pop them however they
    end (with the error, if any), inline: no context manager's frames on every code file."""
    return provenance.push_many((head, spec) if head is not None else (spec,), provenance.frame_at(1))


# --- decisions ---------------------------------------------------------------------------------------


def _refuse(code, digest, rule, chain, *, suggestion=None, detail=None):
    info = {"repo": code.repo, "revision": code.revision, "file": code.file, "sha256": digest, "snapshot": code.path}
    info.update(detail or {})
    return decision.refuse(ACTION, code.target, rule, chain=chain, suggestion=suggestion,
                           violation=RemoteCodeViolation, detail=info)


def _decide(code, digest, chain) -> None:
    src, why = remote_code.match(_policy.remote_code, code, digest, _policy.remote_code_by_repo)
    if src is not None:
        return
    hint = None
    if code.revision:
        with provenance.internal():
            hint = remote_code.suggestion(code)
        hint += "\n# or review and pin every repo the model pulls code from: tmtguard pin <model>"
    _refuse(code, digest, f"remote code {code.target} is not allowed: {why}", chain, suggestion=hint)


def _tampered(code, digest, copy, copy_digest, chain) -> None:
    _refuse(code, digest,
            f"the modules-cache copy that would run ({copy}) has sha256 {copy_digest or '(not compiled from bytes)'}, but "
            f"{code.path} has {digest}: the copy was modified (transformers never refreshes an existing "
            "copy); delete it to let transformers copy the snapshot again",
            chain, detail={"copy": copy, "copy_sha256": copy_digest})


def _is_folder(repo: str, load: _Load | None) -> bool:
    """``repo`` names a local folder (not a hub repo id): for the load's own model, as resolved once
    per load."""
    if load is not None and load.name == repo:
        _resolve_kind(load)
        return load.path is not None
    return os.path.isdir(repo)


def _identify(filename: str, req: _Request | None, load: _Load | None = None):
    if req is not None and req.repo is not None and _is_folder(req.repo, load):
        return remote_code.local_file(req.repo, filename)
    code = remote_code.hub_file(filename)
    if code is not None:
        return code
    folder = os.path.dirname(filename)
    if req is not None and req.module_file:  # a nested module file: its folder is the repo's root
        for _ in range(str(req.module_file).count("/")):
            folder = os.path.dirname(folder)
    return remote_code.local_file(folder, filename)


def _modules_cache() -> str:
    return getattr(sys.modules.get(DMU), "HF_MODULES_CACHE", None) or ""


# --- the replacements ----------------------------------------------------------------------------------


def _check_imports(original):
    @functools.wraps(original)
    def check_imports(filename):
        if not _on:
            return original(filename)
        req = _REQUEST.get()
        load = _LOAD.get()
        try:
            with provenance.internal():
                path = os.fspath(filename)
                code = _identify(path, req, load)
                digest = provenance.file_digest(path)
            head = _head_spec(load, code)
        except Exception as exc:
            decision.failed(ACTION, str(filename), exc)
            return original(filename)
        frames, token = _push(head, _code_spec(code, digest))
        try:
            _decide(code, digest, provenance.peek())
            if req is not None:
                req.record = _Record(code, digest)
            result = original(filename)
        except BaseException as exc:
            provenance.pop_many(frames, token, exc)
            raise
        provenance.pop_many(frames, token)
        return result

    return check_imports


def _get_cached_module_file(original):
    @functools.wraps(original)
    def get_cached_module_file(*args, **kwargs):
        if not _on:
            return original(*args, **kwargs)
        repo = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        module_file = args[1] if len(args) > 1 else kwargs.get("module_file")
        req = _Request(os.fspath(repo) if repo is not None else None, module_file)
        token = _REQUEST.set(req)
        try:
            relpath = original(*args, **kwargs)
        finally:
            _REQUEST.reset(token)
        _adopt_copy(relpath, req)
        return relpath

    return get_cached_module_file


def _adopt_copy(relpath, req: _Request) -> None:
    """The copy get_cached_module_file made (or found) is to be the snapshot file it decided: noted by
    the path transformers will run it from. Its bytes are checked in get_class_in_module, right before
    they run (nothing runs the copy in between)."""
    copy = os.path.join(_modules_cache(), os.fspath(relpath))
    rec = req.record
    if rec is None:
        decision.failed(ACTION, copy, RuntimeError(
            "get_cached_module_file returned a module without calling check_imports through "
            f"{DMU}'s globals: this transformers version's remote-code internals no longer match what "
            "tmtguard guards"))
        return
    _fetched[copy] = rec


def _get_class_in_module(original):
    @functools.wraps(original)
    def get_class_in_module(class_name, module_path, *args, **kwargs):
        if not _on:
            return original(class_name, module_path, *args, **kwargs)
        load = _LOAD.get()
        copy = os.path.join(_modules_cache(), os.fspath(module_path))
        real = provenance.realpath(copy)
        main = _fetched.get(copy) or _decided.get(real)
        if main is not None:
            _decided[real] = main
        head = _head_spec(load, main.code if main else None)
        spec = _code_spec(main.code, main.digest) if main else ("remote_code", copy, copy, None, None, None)
        # one push of the model and the file that runs; the plan's own chains end at the model
        frames, token = _push(head, spec)
        try:
            try:
                files = _plan(copy, real, main, provenance.peek())
            except decision.Violation:
                raise
            except Exception as exc:
                decision.failed(ACTION, copy, exc)
                files = []
            for name, rec, file_real, chain in files:
                # the real path was resolved in _plan (the bytes are checked as Python compiles them)
                verified = file_real if rec.digest is not None else None
                for alias in dict.fromkeys(name):  # the names it runs under, once each
                    provenance.register_model_code(alias, chain, verified)
            cls = original(class_name, module_path, *args, **kwargs)
        except BaseException as exc:
            _planned.files = None  # the plan's list serves this call only, whatever way it ends
            provenance.pop_many(frames, token, exc)
            raise
        _planned.files = None
        provenance.pop_many(frames, token)
        if main is not None and isinstance(cls, type):
            _origins[cls] = main
        if load is not None:
            load.delivered.add(cls)
        return cls

    return get_class_in_module


def _plan(copy: str, real: str, main: _Record | None, pushed: tuple) -> list:
    """Right before exec: decide every file the copy (``real``: its real path) imports relatively,
    expect each to compile from the bytes decided (see _expect) and returns [((names the file runs
    under...), _Record, real path, chain)] to register as model code. ``pushed``: the chain of the
    copy, as pushed (the model, then the copy)."""
    outer = pushed[:-1]
    base = _modules_cache()
    modpath = (_path_str(copy), _abspath(copy))  # as get_class_in_module names it, and absolute
    if main is None:
        code = remote_code.CodeFile("?", "", os.path.relpath(copy, base), copy, local=True)
        decision.refuse(ACTION, copy,
                        f"remote code {copy} was not fetched through get_cached_module_file, so tmtguard "
                        "never decided it (get_class_in_module called directly)",
                        chain=outer + (_frame(("remote_code", copy, copy, None, None, None)),),
                        violation=RemoteCodeViolation, detail={"copy": copy})
        return [((*modpath, copy), _Record(code, None), real, pushed)]
    files = [((*modpath, copy), main, real, pushed)]
    _expect(copy, real, main, pushed)
    folder = os.path.dirname(copy)
    with provenance.internal():
        related = _relative_import_files(copy, main)
    # what transformers' get_relative_import_files(copy) returns, for its module hash right after
    _planned.files = (modpath[0], tuple(related))
    inside = posixpath.dirname(main.code.file)
    for rel_copy in related:
        rel_real = provenance.realpath(rel_copy)
        name = _relative_name(rel_copy, folder)
        if _plain(name) and (not inside or _clean(inside)):
            file = f"{inside}/{name}" if inside else name
        else:
            file = posixpath.normpath(posixpath.join(inside, name))
        rec = _fetched.get(rel_copy) or _decided.get(rel_real)
        if rec is None or rec.code.file != file or rec.code.repo != main.code.repo:
            snapshot = os.path.join(main.code.root, *file.split("/"))
            code = remote_code.CodeFile(main.code.repo, main.code.revision, file, snapshot, main.code.local)
            with provenance.internal():
                digest = provenance.file_digest(snapshot)
            rec = _Record(code, digest)
            _decide(code, digest, outer + (_frame(_code_spec(code, digest)),))
        _decided[rel_real] = rec
        chain = outer + (_frame(_code_spec(rec.code, rec.digest)),)
        # imported by name (not by path as the copy is): its bytecode is dropped as it is imported
        _expect(rel_copy, rel_real, rec, chain, drop=False)
        files.append(((rel_copy, _abspath(rel_copy)), rec, rel_real, chain))
    return files


def _path_str(path: str) -> str:
    """``str(Path(path))`` without building a Path when ``path`` is clean (see _clean; Path drops
    empty and ``.`` components and a trailing slash, so a clean path is already in its form): the
    common case, a modules-cache path joined by os.path.join."""
    return path if _clean(path) else str(Path(path))


def _clean(path: str) -> bool:
    """``path`` has no empty, ``.`` or ``..`` component and no trailing slash: os.path.normpath
    returns it unchanged."""
    return bool(path) and "//" not in path and "/./" not in path and "/../" not in path \
        and not path.endswith(("/", "/.", "/..")) and not path.startswith(("./", "../")) and path not in (".", "..")


def _abspath(path: str) -> str:
    """os.path.abspath(path) without its normpath work when ``path`` is absolute and clean already."""
    return path if path.startswith("/") and _clean(path) else os.path.abspath(path)


def _plain(name: str) -> bool:
    """A file name with no folder part and no ``.``/``..`` (joined by a plain ``/``)."""
    return bool(name) and "/" not in name and name not in (".", "..")


def _relative_name(path: str, folder: str) -> str:
    """os.path.relpath(path, folder) with ``/`` separators, without its work when ``path`` is a
    clean name directly below a clean ``folder`` (a relative import of the module next to it)."""
    if path.startswith(folder) and path[len(folder):len(folder) + 1] == "/" and _clean(folder):
        rest = path[len(folder) + 1:]
        if _plain(rest):
            return rest
    return os.path.relpath(path, folder).replace(os.sep, "/")


def _relative_import_files(module_file: str, main: _Record | None = None) -> list:
    """transformers' get_relative_import_files(module_file), the same list, built with string joins
    instead of pathlib when every relative import is a plain name (``str(Path(parent) / m)`` is then
    ``parent + "/" + m``); otherwise transformers' own function. Each file's imports come from
    get_relative_imports (memoized per sha256 by _memo_relative_imports). ``main``: the record the
    copy ``module_file`` was decided as: a copy is expected to hold its snapshot file's bytes (checked
    as it compiles), so a copy get_cached_module_file returned is looked up in the memo by the digest
    decided for it, without reading or even stat'ing it (the answer for the bytes that will run)."""
    dmu = sys.modules[DMU]
    get = getattr(dmu, "get_relative_imports", None)
    if get is None:
        return dmu.get_relative_import_files(module_file)
    head, sep, _ = _path_str(module_file).rpartition("/")
    prefix = head + "/" if head else sep  # "a/" for a/x.py, "/" for /x.py, "" for x.py (Path's parent ".")
    everything: list = []
    to_check = [module_file]
    memoized = getattr(get, "_tmtguard_original", None) is not None  # our memo stands in front of it
    while True:
        found = []
        for f in to_check:
            rec = (main if f is module_file else _fetched.get(f)) if memoized else None
            hit = _relative_memo.get(rec.digest) if rec is not None and rec.digest else None
            found.extend(hit if hit is not None else get(f))
        for m in found:
            if not m or m == "." or "/" in m:  # Path would drop or re-root the component
                return dmu.get_relative_import_files(module_file)
        files = [f"{prefix}{m}.py" for m in found]
        to_check = [f for f in files if f not in everything]
        if not to_check:
            return everything
        everything.extend(to_check)


def _expect(copy: str, real: str, rec: _Record, chain: tuple, drop: bool = True) -> None:
    """``copy`` (real path ``real``) is to run as ``rec``: Python must compile it from bytes with
    ``rec``'s digest (checked on its compile event, see compiling). Its cached bytecode is removed
    (``drop``; for a relative import, when the import guard sees it imported: see cache_module), so
    that Python compiles it (a module body run from bytecode is refused, see module_runs). The
    expectation stays: whenever Python compiles the copy again (a relative import made at inference,
    a reload), it is checked again. ``chain``: the chain a refusal names."""
    before = _expected.get(real)
    if before is None or before[0].digest != rec.digest:
        # (not for the same bytes: another thread may be between compile and run)
        _compiled.discard(real)
        _compiled.discard(copy)
    _expected[real] = _expected[copy] = (rec, chain)  # by the path Python compiles it under, and its real path
    folder = os.path.dirname(real)
    if folder not in _cache_folders:
        _cache_folders[folder] = rec
    if not drop:
        return
    problem = _drop_bytecode(copy)
    if problem:
        _refuse(rec.code, rec.digest, f"the modules cache was modified: {problem}", chain, detail={"copy": copy})


def compiling(filename, source) -> bool:
    """The compile event of a source file the code guard sees (a guarded load or model code acting):
    when it is a modules-cache copy planned to run, its bytes must be those decided. The bytes
    hashed are those Python compiles, so nothing can change the file between the check and the run.
    Refused like a modified copy (``remote_code.load``; enforce raises from ``compile``). True when
    the bytes are those decided."""
    if not _on or not isinstance(filename, str):
        return False
    expected = _lookup(filename)
    if expected is None:
        return False
    rec, chain = expected
    if isinstance(source, str):
        source = source.encode("utf-8")
    if isinstance(source, (bytes, bytearray, memoryview)):
        digest = hashlib.sha256(source).hexdigest()
    else:
        digest = None  # an AST compiled under the copy's name (an import hook rewriting it): unverifiable
    if digest == rec.digest and digest is not None:
        _compiled.add(filename)
        return True
    _compiled.discard(filename)
    _tampered(rec.code, rec.digest, filename, digest, chain)
    return False


def _lookup(filename: str):
    """The expectation for a file Python compiles or runs: by the path it is named by, else (a
    modules-cache path under another name: a link, another ``sys.path`` entry) by its real path."""
    expected = _expected.get(filename)
    if expected is None and "transformers_modules" in filename and filename.endswith(".py"):
        expected = _expected.get(provenance.realpath(filename))
    return expected


def module_runs(code) -> None:
    """The import machinery is about to run a module body (its ``exec`` event): a modules-cache copy
    planned to run must have been compiled from verified bytes just before (not loaded from cached
    bytecode, which no compile event shows)."""
    if not _on or not _expected:
        return
    filename = code.co_filename
    if not isinstance(filename, str):
        return
    if filename in _compiled:
        _compiled.discard(filename)
        return
    expected = _lookup(filename)
    if expected is None:
        return
    rec, chain = expected
    _refuse(rec.code, rec.digest,
            f"the modules cache was modified: {filename} was about to run from cached bytecode, not compiled "
            f"from the verified copy; delete {os.path.dirname(filename)} and transformers copies the "
            "snapshot again", chain, detail={"copy": filename})


def cache_module(name: str, spec, chain) -> bool:
    """The import system is about to import ``name``, a module or package of transformers' modules
    cache (the import guard calls this as it decides the import, inside guarded loads and for model
    code). A package: see package_init. A module: it must be a copy the guard planned (a relative
    import transformers fetched) or an unchanged copy of the snapshot file of its name, decided
    like the model's code (code can import a sibling with ``from . import x``, which transformers does
    not fetch); no extension module, no file of a folder tmtguard never planned. Refused like a
    modified copy. True when it decided the module (a copy, registered as model code with its own
    chain), False when the import guard decides it."""
    if not _on or spec is None:
        return False
    if spec.submodule_search_locations is not None:
        package_init(name, spec, chain)
        return False
    origin = spec.origin if spec.has_location else None
    if not isinstance(origin, str):
        return False  # no file runs
    with provenance.internal():
        real = provenance.realpath(origin)
        expected = _expected.get(real)
        if expected is not None:
            rec, own_chain = expected
            problem = _drop_bytecode(origin)  # compiled, then checked on its compile event
            if problem:
                _refuse(rec.code, rec.digest, f"the modules cache was modified: {problem}", own_chain,
                        detail={"copy": origin, "module": name})
                return False
            if origin not in provenance._model_code:
                provenance.register_model_code(origin, own_chain, real)
            return True
        known = _cache_folders.get(os.path.dirname(real))
        if known is None or not origin.endswith(".py"):
            what = "an extension module" if origin.endswith(tuple(EXTENSION_SUFFIXES)) else "a module"
            decision.refuse(ACTION, origin,
                            f"the modules cache was modified: {what} {origin} that transformers did not copy "
                            f"there is imported as {name}; no allowlist entry permits that: delete "
                            f"{os.path.dirname(origin)} and transformers copies the code again",
                            chain=chain, violation=RemoteCodeViolation, detail={"copy": origin, "module": name})
            return False
        code = known.code
        inside = posixpath.dirname(code.file)
        base_name = os.path.basename(origin)
        file = f"{inside}/{base_name}" if inside else base_name
        snapshot = os.path.join(code.root, *file.split("/"))
        digest = provenance.file_digest(snapshot) if os.path.isfile(snapshot) else None
        copy_digest = provenance.file_digest(origin)
    sibling = remote_code.CodeFile(code.repo, code.revision, file, snapshot, code.local)
    own_chain = chain + (_frame(_code_spec(sibling, digest)),)
    if digest is None or copy_digest != digest:
        _refuse(sibling, digest, f"the modules cache was modified: {origin} is not a copy of {snapshot}",
                own_chain, detail={"copy": origin, "copy_sha256": copy_digest, "module": name})
        return False
    rec = _Record(sibling, digest)
    _decide(sibling, digest, own_chain)
    _decided[real] = rec
    _expect(origin, real, rec, own_chain)
    provenance.register_model_code(origin, own_chain, real)
    return True


def package_init(name: str, spec, chain) -> None:
    """The import system is about to run the ``__init__`` of ``name``, a package of transformers'
    modules cache (``transformers_modules``, a repo's folder, a commit's folder): it must be the empty
    regular file transformers creates, and it is to run from that source (its cached bytecode is
    removed). Called through cache_module by the import guard's finder (and its ``exec`` backstop), as
    the package is imported: transformers runs each copy by its path, so most loads import no package of the modules
    cache, and a package ``__init__`` that is never imported never runs. Refused otherwise, like a
    modified copy (``remote_code.load``; enforce raises)."""
    if not _on or spec is None or spec.submodule_search_locations is None:
        return  # the remote-code guard is off, or not a package
    origin = spec.origin if spec.has_location else None
    if origin is None:
        return  # a namespace package: a folder with no __init__, nothing runs
    with provenance.internal():
        problem = _package_file_problem(origin)
    if problem:
        decision.refuse(ACTION, origin,
                        f"the modules cache was modified: {problem}; no allowlist entry permits that: delete "
                        f"{os.path.dirname(origin)} and transformers creates its packages and copies again",
                        chain=chain, violation=RemoteCodeViolation, detail={"copy": origin, "package": name})


def _package_file_problem(path: str) -> str | None:
    """Why ``path`` is not a package ``__init__`` transformers made (an empty regular ``__init__.py``),
    removing its cached bytecode when it is one; None when it is."""
    if os.path.basename(path) != "__init__.py":
        return f"{path} is not the empty package file transformers creates"
    try:
        st = os.stat(path)
        empty = stat.S_ISREG(st.st_mode) and st.st_size == 0  # a FIFO has size 0 too
    except OSError:
        empty = False
    if not empty:
        return f"{path} is not the empty package file transformers creates"
    return _drop_bytecode(path)  # bytecode stamped with the empty file's mtime and size would run instead


def _drop_bytecode(source: str) -> str | None:
    """Remove the cached bytecode the import system would read for ``source`` (``__pycache__`` next to
    it, or under ``sys.pycache_prefix``), so that it compiles the source; why it could not, or None.
    (Usually there is none: one ``lstat``, which raises no audit event, where ``unlink`` raises one.)"""
    try:
        pyc = _pyc_of(source)
        os.lstat(pyc)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, NotImplementedError) as exc:
        return f"cannot remove the cached bytecode of {source}: {exc}"
    try:
        with provenance.internal():  # unlink raises an audit event (lstat raises none)
            os.unlink(pyc)
    except FileNotFoundError:
        pass
    except OSError as exc:
        return f"cannot remove the cached bytecode of {source}: {exc}"
    return None


def _pyc_of(source: str) -> str:
    """importlib.util.cache_from_source(source), by string joins in the usual case (no
    PYTHONPYCACHEPREFIX, no -O, a clean absolute ``x.py``)."""
    tag = sys.implementation.cache_tag
    if sys.pycache_prefix is None and not sys.flags.optimize and tag and source.endswith(".py") and _clean(source) \
            and source.startswith("/"):
        head, _, name = source.rpartition("/")
        if head and name != ".py":
            return f"{head}/__pycache__/{name[:-3]}.{tag}.pyc"
    return importlib.util.cache_from_source(source)


def _get_class_from_dynamic_module(original):
    @functools.wraps(original)
    def get_class_from_dynamic_module(class_reference, pretrained_model_name_or_path, *args, **kwargs):
        if not _on or _LOAD.get() is not None:
            return original(class_reference, pretrained_model_name_or_path, *args, **kwargs)
        load = _Load("get_class_from_dynamic_module", pretrained_model_name_or_path, kwargs.get("revision"),
                     kwargs.get("cache_dir"))
        token = _LOAD.set(load)
        try:
            return original(class_reference, pretrained_model_name_or_path, *args, **kwargs)
        finally:
            _LOAD.reset(token)

    return get_class_from_dynamic_module


REPLACEMENTS = {
    "get_class_from_dynamic_module": _get_class_from_dynamic_module,
    "get_cached_module_file": _get_cached_module_file,
    "check_imports": _check_imports,
    "get_class_in_module": _get_class_in_module,
}


# --- the auto classes: which model, and classes served from the registries -------------------------------


def _entry(loader: str, func):
    @functools.wraps(func)
    def entry(cls, *args, **kwargs):
        if not _on:
            return func(cls, *args, **kwargs)
        if loader == "from_config":
            config = args[0] if args else kwargs.get("config")
            name = getattr(config, "name_or_path", None) or None
        else:
            name = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        current = _LOAD.get()
        load_token = None
        if current is None or current.name != name:
            load_token = _LOAD.set(_Load(loader, name, kwargs.get("revision"), kwargs.get("cache_dir")))
        auto_token = _AUTO.set(cls.__name__)
        try:
            result = func(cls, *args, **kwargs)
            obj = result[0] if isinstance(result, tuple) and result else result
            served = type(obj)
            if served in _origins or served.__module__.startswith(DYNAMIC_PREFIX):
                _check_served(served, _holder(obj))
            return result
        finally:
            _AUTO.reset(auto_token)
            if load_token is not None:
                _LOAD.reset(load_token)

    entry._tmtguard_original = func
    return entry


def _holder(obj):
    config = getattr(obj, "config", None)
    return config if config is not None and hasattr(config, "auto_map") else obj


def _get_model_class(original):
    @functools.wraps(original)
    def _get_model_class(config, model_mapping):
        model_class = original(config, model_mapping)
        if _on and (model_class in _origins or getattr(model_class, "__module__", "").startswith(DYNAMIC_PREFIX)):
            _check_served(model_class, config)
        return model_class

    return _get_model_class


def _origin_of(cls) -> _Record | None:
    rec = _origins.get(cls)
    if rec is None:
        module = sys.modules.get(getattr(cls, "__module__", ""))
        path = getattr(module, "__file__", None)
        rec = _decided.get(provenance.realpath(path)) if path else None
    return rec


def _declared(holder, auto_name) -> list:
    amap = getattr(holder, "auto_map", None)
    if not isinstance(amap, dict):
        amap = (getattr(holder, "init_kwargs", None) or {}).get("auto_map")
    if not isinstance(amap, dict):
        return []
    # the auto class that asked is unknown when it was called outside the wrapped entry points: every
    # class the repo declares is then a candidate
    values = [amap.get(auto_name)] if auto_name is not None else list(amap.values())
    refs = []
    for value in values:
        refs.extend(r for r in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(r, str))
    return refs


def _same_code(parsed, rec: _Record, cls) -> bool:
    repo, module_file, class_name = parsed
    code = rec.code
    same_repo = provenance.realpath(repo) == code.repo if code.local else repo == code.repo
    return same_repo and module_file == code.file and class_name == cls.__name__


def _check_served(cls, holder) -> None:
    """A registry (AutoModel.register, AutoConfig.register, ...) hands this load a class that remote
    code of some repo defined, without loading the code this load's repo declares. Decide it as that
    declared code (or, when the repo declares none, as the repo itself) before the load goes on."""
    load = _LOAD.get()
    if load is not None:
        if cls in load.delivered or cls in load.checked:
            return
        load.checked.add(cls)
    try:
        _decide_served(cls, holder, load)
    except decision.Violation:
        raise
    except Exception as exc:
        decision.failed(ACTION, f"{cls.__module__}.{cls.__qualname__}", exc)


def _decide_served(cls, holder, load) -> None:
    auto_name = _AUTO.get()
    model = str(os.fspath(load.name) if load is not None and load.name is not None else getattr(holder, "name_or_path", ""))
    origin = _origin_of(cls)
    declared = [(ref, p) for ref in _declared(holder, auto_name) if (p := remote_code.parse_ref(ref, model)) is not None]
    head = _head_frames(load)
    if origin is not None:
        for _ref, p in declared:
            if _same_code(p, origin, cls):
                # the code this repo declares is the very code that was registered: decide it again, as is
                _decide(origin.code, origin.digest, provenance.peek() + head + (_frame(_code_spec(origin.code, origin.digest)),))
                return
    where = origin.code.target if origin is not None else cls.__module__
    served = f"{cls.__module__}.{cls.__qualname__}"
    detail = {"registered_class": served, "registered_from": where}
    asked = f"for {auto_name}" if auto_name else "in its auto_map"
    if declared:
        ref, p = next(((r, p) for r, p in declared if p[2] == cls.__name__), declared[0])
        code = _declared_code(p, load)
        with provenance.internal():
            digest = provenance.file_digest(code.path) if code.path else None
        src, why = remote_code.match(_policy.remote_code, code, digest, _policy.remote_code_by_repo)
        if src is not None:
            return
        hint = None
        if code.revision and digest:
            with provenance.internal():
                hint = remote_code.suggestion(code)
        _refuse(code, digest,
                f"{model} declares {ref} {asked}, but transformers would hand it {served} (registered from "
                f"{where}) without loading that code; and the declared code is not allowed: {why}",
                provenance.peek() + head + (_frame(_code_spec(code, digest)),), suggestion=hint,
                detail={**detail, "declared": ref})
        return
    local = load is not None and load.path is not None
    repo = load.path if local else model
    revision = (remote_code.local_revision(repo) if local else load.commit) if load is not None else None
    if revision and remote_code.repo_allowed(_policy.remote_code, repo, revision, local) is not None:
        return
    target = f"{repo}@{revision or '?'}"
    hint = "\n".join(["remote_code:", "  allow:"] + remote_code.entry_lines(repo, revision, {})) if revision else None
    decision.refuse(ACTION, target,
                    f"{repo} declares no remote code {asked}, but transformers would hand it {served} (registered "
                    f"from {where}); no remote_code.allow entry names {target}",
                    chain=provenance.peek() + head, violation=RemoteCodeViolation, suggestion=hint,
                    detail={"repo": repo, "revision": revision, **detail})


def _head_frames(load) -> tuple:
    spec = _head_spec(load)
    return (_frame(spec),) if spec is not None else ()


def _declared_code(parsed, load):
    repo, module_file, _cls = parsed
    if os.path.isdir(repo):
        folder = provenance.realpath(repo)
        return remote_code.local_file(folder, os.path.join(folder, *module_file.split("/")))
    if load is not None and load.repo == repo and load.commit:
        commit = load.commit
    else:
        commit = _hub_commit(repo, None, load.cache_dir if load is not None else None)
    cache = os.fspath(load.cache_dir) if load is not None and load.cache_dir else _hub_cache()
    path = os.path.join(cache, "models--" + repo.replace("/", "--"), "snapshots", commit or "?", *module_file.split("/"))
    return remote_code.CodeFile(repo, commit or "", module_file, path if commit else "")


# --- patching --------------------------------------------------------------------------------------------


class _InternalsChanged(RuntimeError):
    """transformers' remote-code internals do not look like what this guard patches."""


def _verify(dmu) -> None:
    """Raise _InternalsChanged naming what differs from the transformers 5.x internals guarded here."""
    problems = []
    for name, (params, calls) in EXPECTED.items():
        fn = getattr(dmu, name, None)
        fn = getattr(fn, "_tmtguard_original", fn)
        if not isinstance(fn, types.FunctionType):
            problems.append(f"{name} is missing")
            continue
        code = fn.__code__
        args = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        missing = [p for p in params if p not in args]
        if missing:
            problems.append(f"{name} has no parameter {', '.join(missing)}")
        names = _names(code)
        absent = [c for c in calls if c not in names]
        if absent:
            problems.append(f"{name} no longer calls {', '.join(absent)}")
    for attr, value in vars(dmu).items():
        value = getattr(value, "_tmtguard_original", value)
        if not isinstance(value, types.FunctionType) or value.__module__ != dmu.__name__:
            continue
        for used in _names(value.__code__) & CODE_RUNNING.keys():
            if CODE_RUNNING[used] != attr:
                problems.append(f"{attr} uses {used}, which this guard does not intercept")
    if not isinstance(getattr(dmu, "HF_MODULES_CACHE", None), str):
        problems.append("HF_MODULES_CACHE is missing")
    if not callable(getattr(dmu, "get_relative_import_files", None)):
        problems.append("get_relative_import_files is missing")
    if problems:
        version = getattr(sys.modules.get("transformers"), "__version__", "?")
        raise _InternalsChanged(f"transformers {version}: its remote-code internals no longer match what tmtguard "
                               f"guards ({'; '.join(problems)}); remote code cannot be guarded")


def _names(code) -> set:
    out = set()
    todo = [code]
    while todo:
        c = todo.pop()
        out.update(c.co_names)
        todo.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return out


def _set(owner, attr: str, original, replacement) -> None:
    setattr(owner, attr, replacement)
    _patched.append((owner, attr, original, replacement))


def _patch_dmu(dmu) -> None:
    try:
        _verify(dmu)
    except _InternalsChanged as exc:
        # enforce: GuardError (importing transformers' auto classes fails, loudly); audit: an event
        decision.failed(ACTION, DMU, exc)
        return
    for name, make in REPLACEMENTS.items():
        current = getattr(dmu, name)
        if getattr(current, "_tmtguard_original", None) is not None:
            continue
        held = _replacements.get(id(current))
        replacement = held[1] if held is not None and held[0] is current else make(current)
        replacement._tmtguard_original = current
        _replacements[id(current)] = (current, replacement)
        _set(dmu, name, current, replacement)
    for name, make in (("get_relative_imports", _memo_relative_imports),
                       ("get_relative_import_files", _planned_relative_import_files)):
        current = getattr(dmu, name, None)
        if isinstance(current, types.FunctionType) and getattr(current, "_tmtguard_original", None) is None:
            replacement = make(current)  # speed only: not part of what is guarded
            replacement._tmtguard_original = current
            _set(dmu, name, current, replacement)
    _rebind()


def _planned_relative_import_files(original):
    """get_class_in_module hashes the copy and the files it imports relatively (to tell whether a module
    it loaded before changed), listing them with get_relative_import_files: the list the plan built for
    that copy a moment before, on the same thread, which is handed back instead of being built again
    (~60 us a file). Any other call, or once that get_class_in_module returned, is transformers' own."""

    @functools.wraps(original)
    def get_relative_import_files(module_file):
        held = getattr(_planned, "files", None)
        if held is not None:
            try:
                same = os.fspath(module_file) == held[0]
            except TypeError:
                same = False
            if same:
                return list(held[1])
        return original(module_file)

    return get_relative_import_files


def _memo_relative_imports(original):
    """transformers reads and regex-scans each remote-code file for its relative imports several times
    per load (check_imports on the snapshot, get_class_in_module's module hash on the copy, and the
    plan above), ~80 us a scan for a 1 KB file. The answer depends only on the file's bytes: it is
    kept per sha256 (provenance.file_digest, which the guard computes for every code file anyway and
    keeps per device, inode, size and mtime), so the copy of a snapshot file is not scanned again and
    a changed file is. An answer is kept only if the file had the same digest after the scan."""
    memo = _relative_memo

    @functools.wraps(original)
    def get_relative_imports(module_file):
        try:
            path = os.fspath(module_file)
        except TypeError:
            return original(module_file)
        digest = provenance.file_digest(path) if isinstance(path, str) else None
        if digest is None:
            return original(module_file)
        hit = memo.get(digest)
        if hit is not None:
            return list(hit)
        result = original(module_file)
        if provenance.file_digest(path) == digest:
            if len(memo) >= 1024:
                memo.clear()
            memo[digest] = tuple(result)
        return result

    return get_relative_imports


def _rebind() -> None:
    """Every module holding an original (bound by name before the patch) gets the replacement."""
    names = tuple(REPLACEMENTS)
    for mod_name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict) or mod_name == DMU or mod_name.startswith("tmtguard"):
            continue
        if mod_name.startswith("transformers"):
            items = list(namespace.items())
        else:
            items = [(n, namespace.get(n)) for n in names if n in namespace]
        for attr, value in items:
            held = _replacements.get(id(value))
            if held is not None and held[0] is value:
                _set(module, attr, value, held[1])


def _patch_entry_points(module) -> None:
    for cls_name, method in ENTRY_POINTS.get(module.__name__, ()):
        owner = getattr(module, cls_name, None)
        if isinstance(owner, type):
            _wrap_entry(owner, method)
    if module.__name__ == "transformers.models.auto.auto_factory":
        # auto_class_update() gives AutoModel, AutoModelForCausalLM... COPIES of these methods (copy_func):
        # the ones made before this patch (transformers imported before tmtguard) are wrapped here; later
        # copies are copies of the wrapper already.
        todo = list(module._BaseAutoModelClass.__subclasses__()) if hasattr(module, "_BaseAutoModelClass") else []
        while todo:
            sub = todo.pop()
            todo.extend(sub.__subclasses__())
            for method in ("from_pretrained", "from_config"):
                _wrap_entry(sub, method)
        current = getattr(module, "_get_model_class", None)
        if isinstance(current, types.FunctionType) and getattr(current, "_tmtguard_original", None) is None:
            replacement = _get_model_class(current)
            replacement._tmtguard_original = current
            _set(module, "_get_model_class", current, replacement)


def _wrap_entry(owner: type, method: str) -> None:
    raw = owner.__dict__.get(method)
    if isinstance(raw, classmethod) and getattr(raw.__func__, "_tmtguard_original", None) is None:
        _set(owner, method, raw, classmethod(_entry(method, raw.__func__)))


def _on_import(module) -> None:
    if not _on:
        return
    if module.__name__ == DMU:
        _patch_dmu(module)
    else:
        _patch_entry_points(module)
        dmu = sys.modules.get(DMU)
        if dmu is not None and getattr(getattr(dmu, "get_class_in_module", None), "_tmtguard_original", None) is None:
            # dynamic_module_utils is there but unguarded (its own hook failed and the import was
            # retried): try again, failing as loudly as the first time
            _patch_dmu(dmu)


def install(policy) -> None:
    global _on, _policy, _hooked
    _policy = policy
    _on = True
    names = (DMU,) + BINDING_SITES
    if not _hooked:
        _hooked = True
        # every hook first, so that a failure below (changed internals) leaves none of them missing
        for name in names:
            if name not in sys.modules:
                wrapt.register_post_import_hook(_on_import, name)
    for name in names:
        module = sys.modules.get(name)
        if module is not None:
            _on_import(module)


def uninstall() -> None:
    global _on
    _on = False
    while _patched:
        owner, attr, original, replacement = _patched.pop()
        current = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        if current is replacement:
            setattr(owner, attr, original)
