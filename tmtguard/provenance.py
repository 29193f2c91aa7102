"""Who is acting: the chain of nested loads (per thread and per asyncio task), and the code and
installed distribution that asked.

A top-level ``pickle.loads`` of plain data never needs a frame, so those loads record a *pending*
frame in a thread-local (two attribute writes) and materialize it only when something needs the
chain: a decision beyond the global allowlist, or a nested load. Container loaders (``torch.load``,
``numpy.load``, ``joblib.load``) and every nested load push a frame eagerly.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
from contextvars import ContextVar

from . import _unpatched, telemetry

_CHAIN: ContextVar[tuple] = ContextVar("tmtguard_chain", default=())

# Files of tmtguard itself: origin attribution skips them.
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# Hash small artifacts for events right away; a larger one only when a rule pins a digest.
EVENT_HASH_LIMIT = 64 * 1024 * 1024
_digest_cache: dict = {}  # (dev, inode, size, mtime_ns) -> hex
_digest_lock = threading.Lock()


class LoadFrame:
    """One guarded load: which loader, which artifact, and (lazily) its sha256."""

    __slots__ = ("loader", "artifact", "path", "size", "repo", "revision", "container", "unpickling",
                 "span", "reported", "_data", "_sha256", "_parent_ctx")

    def __init__(self, loader: str, artifact: str, *, path=None, size=None, data=None, repo=None,
                 revision=None, container=False, sha256=None):
        self.loader = loader
        self.artifact = artifact
        self.path = path
        self.size = size
        self.repo = repo
        self.revision = revision
        self.container = container
        self.unpickling = not container
        self.span = None
        self.reported = None
        self._data = data
        self._sha256 = sha256

    def digest(self) -> str | None:
        """sha256 of the artifact, computed once: of the bytes for an in-memory load, of the file
        (cached by device, inode, size and mtime) for a path. None when it cannot be known."""
        if self._sha256 is None:
            data = self._data
            if data is not None:
                if hasattr(data, "getbuffer"):
                    with data.getbuffer() as view:
                        self._sha256 = hashlib.sha256(view).hexdigest()
                else:
                    self._sha256 = hashlib.sha256(data).hexdigest()
            elif self.path is not None:
                self._sha256 = file_digest(self.path)
        return self._sha256

    def event_digest(self) -> str | None:
        """The digest for an event record: known, cheap, or None (never hash a huge file for a log line)."""
        if self._sha256 is None:
            size = self.size if self.size is not None else (len(self._data) if self._data is not None else None)
            if size is None and self.path is not None:
                try:
                    size = os.stat(self.path).st_size
                except OSError:
                    return None
            if size is not None and size <= EVENT_HASH_LIMIT:
                return self.digest()
            return _cached_file_digest(self.path) if self.path else None
        return self._sha256

    def as_dict(self) -> dict:
        out = {"loader": self.loader, "artifact": self.artifact, "sha256": self.event_digest()}
        if self.repo:
            out["repo"] = self.repo
            if self.revision:
                out["revision"] = self.revision
        return out

    def describe(self) -> str:
        digest = self._sha256 or self.event_digest()
        return f"{self.loader}({self.artifact}" + (f" sha256={digest[:12]}…" if digest else "") + ")"

    def __repr__(self) -> str:
        return f"LoadFrame({self.loader!r}, {self.artifact!r})"


def _stat_key(path: str):
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _cached_file_digest(path: str) -> str | None:
    try:
        return _digest_cache.get(_stat_key(path))
    except OSError:
        return None


def file_digest(path: str) -> str | None:
    try:
        key = _stat_key(path)
    except OSError:
        return None
    cached = _digest_cache.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with _internal_work():
        try:
            with _unpatched.open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            return None
    with _digest_lock:
        _digest_cache[key] = h.hexdigest()
    return _digest_cache[key]


def describe_artifact(obj) -> tuple[str, str | None, bytes | None, int | None]:
    """(artifact label, path, in-memory bytes, size) for whatever a loader was given."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        n = len(obj)
        return f"<bytes:{n}>", None, obj, n
    if isinstance(obj, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(obj))
        return path, path, None, None
    name = getattr(obj, "name", None)
    if isinstance(name, str) and name and not name.startswith("<"):
        path = os.path.abspath(name)
        return path, path, None, None
    if getattr(obj, "getbuffer", None) is not None:
        # An in-memory stream (torch.storage._load_from_bytes wraps bytes in BytesIO): keep a
        # reference, hash lazily from its buffer, never copy it.
        try:
            with obj.getbuffer() as view:
                n = view.nbytes
            return f"<bytes:{n}>", None, obj, n
        except Exception:
            pass
    return f"<stream:{type(obj).__name__}>", None, None, None


# --- the chain --------------------------------------------------------------------------------


class _Lazy(threading.local):
    pending = None  # (loader, obj) of a top-level load that has not yet needed a frame
    token = None
    frame = None
    internal = 0  # >0 while tmtguard does its own work (sinks, hashing): guards stand aside


_lazy = _Lazy()


def chain() -> tuple:
    """The current chain of loads, outermost first. Materializes a pending top-level load."""
    c = _CHAIN.get()
    if c or _lazy.pending is None:
        return c
    return _materialize()


def peek() -> tuple:
    """The chain without materializing anything (for fast checks)."""
    return _CHAIN.get()


def active() -> bool:
    return bool(_CHAIN.get()) or _lazy.pending is not None


def _materialize() -> tuple:
    loader, obj = _lazy.pending
    _lazy.pending = None
    label, path, data, size = describe_artifact(obj)
    frame = LoadFrame(loader, label, path=path, data=data, size=size)
    telemetry.start_load(frame, ())
    _lazy.frame = frame
    _lazy.token = _CHAIN.set((frame,))
    return (frame,)


def begin_pending(loader: str, obj) -> bool:
    """Record a top-level load without a frame. False when the caller must push a real frame."""
    if _CHAIN.get():
        return False
    if _lazy.pending is not None:
        # a nested load whose parent had not needed a frame yet: it needs one now
        _materialize()
        return False
    _lazy.pending = (loader, obj)
    return True


def end_pending(error: BaseException | None) -> None:
    _lazy.pending = None
    frame = _lazy.frame
    if frame is not None:
        token = _lazy.token
        _lazy.frame = _lazy.token = None
        _CHAIN.reset(token)
        telemetry.end_load(frame, error)


def push(loader: str, obj, *, container: bool = False, repo=None, revision=None, sha256=None):
    """Push a frame for a load; returns (frame, token) for pop()."""
    parent = chain()
    label, path, data, size = describe_artifact(obj) if not isinstance(obj, tuple) else obj
    frame = LoadFrame(loader, label, path=path, data=data, size=size, repo=repo, revision=revision,
                      container=container, sha256=sha256)
    telemetry.start_load(frame, parent)
    return frame, _CHAIN.set(parent + (frame,))


def pop(frame: LoadFrame, token, error: BaseException | None = None) -> None:
    _CHAIN.reset(token)
    frame._data = None if frame._sha256 is not None else frame._data
    telemetry.end_load(frame, error)


def adoptable() -> LoadFrame | None:
    """A container frame (torch.load, numpy.load...) whose unpickler has not started yet: the
    unpickler it runs belongs to it rather than being a nested load of its own."""
    c = _CHAIN.get()
    if c:
        top = c[-1]
        if top.container and not top.unpickling:
            return top
    return None


class _internal_work:
    """tmtguard's own work (writing events, hashing, exporting spans) is never checked by its guards."""

    __slots__ = ()

    def __enter__(self):
        _lazy.internal += 1

    def __exit__(self, *exc):
        _lazy.internal -= 1


internal = _internal_work


def is_internal() -> bool:
    return _lazy.internal > 0


# --- origin: the code and distribution that asked -----------------------------------------------

_dist_by_file: dict = {}
_top_level_dists = None
_STDLIB = os.path.dirname(os.__file__) + os.sep


def origin(skip: int = 1) -> dict | None:
    """The innermost frame that is not tmtguard's (nor import machinery), with its distribution."""
    f = sys._getframe(skip)
    while f is not None:
        filename = f.f_code.co_filename
        if not filename.startswith(_OWN_DIR) and not filename.startswith("<frozen importlib"):
            break
        f = f.f_back
    if f is None:
        return None
    filename = f.f_code.co_filename
    return {
        "module": f.f_globals.get("__name__"),
        "file": filename,
        "line": f.f_lineno,
        "function": f.f_code.co_name,
        "distribution": distribution_of(filename),
    }


def distribution_of(filename: str) -> dict | None:
    """The installed distribution owning a file ({name, version}), cached; None when none does."""
    try:
        return _dist_by_file[filename]
    except KeyError:
        pass
    with _internal_work():
        result = _lookup_distribution(filename)
    _dist_by_file[filename] = result
    return result


def _lookup_distribution(filename: str) -> dict | None:
    global _top_level_dists
    if not filename or filename.startswith("<"):
        return None
    path = os.path.abspath(filename)
    if path.startswith(_STDLIB) and "site-packages" not in path and "dist-packages" not in path:
        return {"name": "python-stdlib", "version": sys.version.split()[0]}
    import importlib.metadata as md

    best = None
    for entry in sys.path:
        entry = os.path.abspath(entry or ".") + os.sep
        if path.startswith(entry) and (best is None or len(entry) > len(best)):
            best = entry
    if best is None:
        return None
    top = path[len(best):].split(os.sep, 1)[0]
    top = top[:-3] if top.endswith(".py") else top
    if _top_level_dists is None:
        try:
            _top_level_dists = md.packages_distributions()
        except Exception:
            _top_level_dists = {}
    names = _top_level_dists.get(top)
    if not names:
        return None
    try:
        return {"name": names[0], "version": md.version(names[0])}
    except Exception:
        return {"name": names[0], "version": None}


# --- model code: code that came from an artifact, attributed whenever it runs ---------------------

# filename -> chain of the load that brought the code in. Read by acting_chain() on every guarded
# action outside a load, so the common case (no model code at all) is one empty-dict test.
_model_code: dict = {}


def register_model_code(filename: str, chain: tuple) -> None:
    """Code in ``filename`` came from an artifact: actions it takes, now or at inference, carry ``chain``."""
    _model_code[filename] = tuple(chain)


def model_code_frame(skip: int = 1):
    """(chain, python frame) of the innermost model code on the stack, or None."""
    if not _model_code:
        return None
    f = sys._getframe(skip)
    get = _model_code.get
    while f is not None:
        c = get(f.f_code.co_filename)
        if c is not None:
            return c, f
        f = f.f_back
    return None


def acting_chain():
    """The chain an action is attributed to: the current load's, else that of model code on the
    stack, else None (application code, not policed by default)."""
    c = _CHAIN.get()
    if c:
        return c
    if _lazy.pending is not None:
        return _materialize()
    if not _model_code:
        return None
    found = model_code_frame(2)
    return found[0] if found is not None else None
