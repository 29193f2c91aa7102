"""Who is acting: the chain of nested loads (per thread and per asyncio task), and the code and
installed distribution that asked.

A top-level ``pickle.loads`` of plain data never needs a frame, so those loads keep no state and
their frame is materialized (from the wrapper's arguments on the stack) only when something needs
the chain: a decision beyond the built-in allowlist, or a nested load. Container loaders
(``torch.load``, ``numpy.load``, ``joblib.load``) and every nested load push a frame eagerly.
"""
from __future__ import annotations

import hashlib
import os
import stat
import sys
import threading
from contextvars import ContextVar

from . import _unpatched, telemetry

try:  # the C library's realpath(3) and the stack walks in C, where tmtguard's extension is built
    from ._auditfast import frames_of as _c_frames_of, model_frame as _c_model_frame, \
        realpath as _c_realpath, set_by_code as _c_set_by_code, start_up as _c_start_up
    # sys._getframe(depth), or None when the stack is not that deep, without the sys._getframe audit
    # event (CPython builds its arguments and calls every hook for each call: the guards ask for frames
    # tens of times a load)
    from ._auditfast import getframe as frame_at
    # frame.f_code, without the object.__getattr__ audit event reading it from Python raises on 3.11
    from ._auditfast import code_of
except ImportError:
    _c_realpath = _c_model_frame = _c_frames_of = _c_start_up = _c_set_by_code = None

    def frame_at(depth: int):
        """sys._getframe(depth) of the caller, or None when the stack is not that deep."""
        try:
            return sys._getframe(depth + 1)
        except ValueError:
            return None

    def code_of(frame):
        """frame.f_code"""
        return frame.f_code


def realpath(path) -> str:
    """os.path.realpath; for an existing path, one realpath(3) call instead of a Python-level lstat
    per component (the guards resolve every path a load or model code touches)."""
    if _c_realpath is not None and isinstance(path, str):
        real = _c_realpath(path)
        if real is not None:
            return real
        if path.startswith(os.sep) and "/." not in path and "//" not in path:
            # A file about to be created (a write, a mkdir): the real path of the nearest existing
            # folder, then the names below it, when none of them exists, not even as a link (a
            # dangling symlink is resolved by the full walk below, as os.path.realpath does).
            head, names = path, []
            for _ in range(8):
                head, name = os.path.split(head)
                if not name or os.path.lexists(os.path.join(head, name)):
                    break
                names.append(name)
                real = _c_realpath(head)
                if real is not None:
                    return os.path.join(real, *reversed(names))
    return os.path.realpath(path)


_CHAIN: ContextVar[tuple] = ContextVar("tmtguard_chain", default=())

# Bumped on every os.environ write (the tamper guard's os.putenv / os.unsetenv handler): what the
# guards derive from environment variables (HOME, HF_HOME...) is recomputed when it changes.
environment_changes = [0]

# Files of tmtguard itself: origin attribution skips them.
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# Hash small artifacts for events right away; a larger one only when a rule pins a digest.
EVENT_HASH_LIMIT = 64 * 1024 * 1024
_digest_cache: dict = {}  # (dev, inode, size, mtime_ns) -> hex
_digest_lock = threading.Lock()


class LoadFrame:
    """One guarded load: which loader, which artifact, and (lazily) its sha256."""

    __slots__ = ("loader", "artifact", "path", "size", "repo", "revision", "container", "unpickling",
                 "span", "reported", "_data", "_sha256", "_parent_ctx", "entry")

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
        self.entry = None  # the Python frame the load was entered from (see acting_chain)

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


def _stat_key(path):
    """(st_dev, st_ino, st_size, st_mtime_ns) of a path or an open file descriptor."""
    st = os.stat(path) if not isinstance(path, int) else _unpatched.os_fstat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


try:  # the same four numbers from C, without building a stat_result (file_digest asks per lookup)
    from ._auditfast import stat_key as _stat_key  # noqa: F811
except ImportError:
    pass

try:  # a small file's stat key and bytes without os.open's audit event (see read_file in _auditfast.c)
    from ._auditfast import read_file as _read_small
except ImportError:
    _read_small = None


def read_small(path: str, limit: int) -> bytes | None:
    """The bytes of a regular file smaller than ``limit``, or None (larger, or not a regular file);
    OSError if it cannot be read. tmtguard's own reads: from C where built, without an audit event."""
    if _read_small is not None:
        got = _read_small(path, limit)
        return got[1] if got is not None else None
    fd = _unpatched.os_open(path, _O_READ)
    try:
        if not stat.S_ISREG(_unpatched.os_fstat(fd).st_mode):
            return None
        data = _unpatched.os_read(fd, limit)
        return data if len(data) < limit else None
    finally:
        _unpatched.os_close(fd)


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
    if _read_small is not None:
        try:
            got = _read_small(path, 1 << 20)
        except OSError:
            return None
        if got is not None:  # filed under the key of what was read (the file may have changed since)
            key, data = got
            digest = hashlib.sha256(data).hexdigest()
            with _digest_lock:
                _digest_cache[key] = digest
            return digest
    h = hashlib.sha256()
    with _internal_work():  # one open(2), read(2)s, close(2): no buffered file object
        try:
            fd = _unpatched.os_open(path, _O_READ)
        except OSError:
            return None
        try:
            # filed under the key of what was read (the file may have been replaced since the stat)
            st = _unpatched.os_fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None  # a FIFO, a device: no content to pin (and reading it would take its data)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            size = st.st_size
            # a small file in one read(2) of its size (+1 to see the end); a large one by the MiB (a
            # 1 MiB buffer per read of a small file costs an mmap/munmap pair)
            small = size < (1 << 20)
            want = size + 1 if small else (1 << 20)
            while True:
                block = _unpatched.os_read(fd, want)
                if not block:
                    break
                h.update(block)
                want = (1 << 16) if small else (1 << 20)
        except OSError:
            return None
        finally:
            _unpatched.os_close(fd)
    digest = h.hexdigest()
    with _digest_lock:
        _digest_cache[key] = digest
    return digest


# non-blocking: opening a FIFO must not wait for a writer (only regular files are read)
_O_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


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


class _Local(threading.local):
    internal = 0  # >0 while tmtguard does its own work (sinks, hashing): guards stand aside


_local = _Local()
_lazy = _local  # the name the guards' inline fast-path tests use

# Lazy frames. A top-level pickle.loads/pickle.load keeps no state at all on its fast path: its wrapper
# function's code object is registered here, and when something needs the chain (a decision beyond
# the built-in allowlist, a nested load) the stack is walked for those wrapper frames, whose
# arguments give the artifact. The wrapper closes a materialized frame when it returns.
_LAZY_CODES: dict = {}  # code object of a lazy wrapper -> (loader name, argument name)
_materialized: dict = {}  # id(python frame of the wrapper) -> (LoadFrame, token)


def register_lazy_loader(code, loader: str, argname: str) -> None:
    _LAZY_CODES[code] = (loader, argname)


# One item per lazy top-level load running in any thread (pickle.loads/load append and pop around the
# unpickler: list methods are single C calls, atomic under the GIL). Empty: no lazy load can be on
# this thread's stack, so chain() skips the stack walk (~50 us under transformers' deep stacks).
_lazy_active: list = []


def chain() -> tuple:
    """The current chain of loads, outermost first (materializing lazy top-level loads)."""
    c = _CHAIN.get()
    if c or not _LAZY_CODES or not _lazy_active:
        return c
    return _materialize()


def peek() -> tuple:
    """The chain without materializing anything (for fast checks)."""
    return _CHAIN.get()


def active() -> bool:
    return bool(chain())


def _materialize() -> tuple:
    found = []
    get = _LAZY_CODES.get
    if _c_frames_of is not None:
        for f in _c_frames_of(_LAZY_CODES, 2):
            if id(f) not in _materialized:
                found.append((f, get(f.f_code)))
    else:
        f = sys._getframe(2)
        while f is not None:
            spec = get(f.f_code)
            if spec is not None and id(f) not in _materialized:
                found.append((f, spec))
            f = f.f_back
    c = _CHAIN.get()
    for f, (loader, argname) in reversed(found):  # outermost first
        label, path, data, size = describe_artifact(f.f_locals.get(argname))
        frame = LoadFrame(loader, label, path=path, data=data, size=size)
        frame.entry = f
        with _internal_work():  # the span's own imports and export are tmtguard's work, never checked
            telemetry.start_load(frame, c)
        c = c + (frame,)
        _materialized[id(f)] = (frame, _CHAIN.set(c))
    return c


def close_lazy(pyframe, error: BaseException | None) -> None:
    """Called by a lazy wrapper on return when frames were materialized: closes its own, if any."""
    held = _materialized.pop(id(pyframe), None)
    if held is not None:
        frame, token = held
        _CHAIN.reset(token)
        frame.entry = None
        telemetry.end_load(frame, error)


def push(loader: str, obj, *, container: bool = False, repo=None, revision=None, sha256=None, entry=None):
    """Push a frame for a load; returns (frame, token) for pop(). ``entry`` is the Python frame that
    stays on the stack for the whole load (default: the caller's)."""
    parent = chain()
    label, path, data, size = describe_artifact(obj) if not isinstance(obj, tuple) else obj
    frame = LoadFrame(loader, label, path=path, data=data, size=size, repo=repo, revision=revision,
                      container=container, sha256=sha256)
    frame.entry = entry if entry is not None else frame_at(1)
    telemetry.start_load(frame, parent)
    return frame, _CHAIN.set(parent + (frame,))


def push_many(specs, entry) -> tuple:
    """push() of container frames given as (loader, label, path, repo, revision, sha256), outermost
    first, with one update of the chain (the remote-code guard pushes a model and its code file
    together); returns (frames, token) for pop_many(). ``entry``: the Python frame that stays on the
    stack for the whole load (a ``with`` block's frame, not its ``__enter__``'s)."""
    c = chain()
    frames = []
    spans = True
    for loader, label, path, repo, revision, sha256 in specs:
        frame = LoadFrame(loader, label, path=path, repo=repo, revision=revision, container=True, sha256=sha256)
        frame.entry = entry
        if spans:
            telemetry.start_load(frame, c)
            spans = frame.span is not None  # none for the first (no tracer, no provider): none for the rest
        c = c + (frame,)
        frames.append(frame)
    return frames, _CHAIN.set(c)


def pop_many(frames, token, error: BaseException | None = None) -> None:
    """pop() of what push_many() pushed, innermost first."""
    _CHAIN.reset(token)
    for frame in reversed(frames):
        frame.entry = None
        if frame.span is not None:
            telemetry.end_load(frame, error)


def call_in_frame(frame: LoadFrame, token, fn, *args, **kwargs):
    """Run ``fn`` inside a frame push() returned, and pop it (with the error, if any) however fn ends."""
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        pop(frame, token, exc)
        raise
    pop(frame, token)
    return result


def pop(frame: LoadFrame, token, error: BaseException | None = None) -> None:
    _CHAIN.reset(token)
    frame.entry = None
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
        _local.internal += 1

    def __exit__(self, *exc):
        _local.internal -= 1


internal = _internal_work


def is_internal() -> bool:
    return _local.internal > 0


# --- origin: the code and distribution that asked -----------------------------------------------

_dist_by_file: dict = {}
_top_level_dists = None
_dists_lock = threading.RLock()
_STDLIB = os.path.dirname(os.__file__) + os.sep


def origin(skip: int = 1) -> dict | None:
    """The code that acted: the innermost frame outside tmtguard and the standard library (which only
    carries out what it was asked: ``subprocess``, ``shutil``, ``importlib``...), falling back to the
    innermost frame outside tmtguard; with its installed distribution. When model code is on the
    stack and is not that frame itself, ``model_code`` names the model code's file and line too."""
    f = sys._getframe(skip)
    first = None
    while f is not None:
        filename = f.f_code.co_filename
        if not filename.startswith(_OWN_DIR):
            if first is None:
                first = f
            if not _stdlib_file(filename):
                break
        f = f.f_back
    f = f or first
    if f is None:
        return None
    filename = f.f_code.co_filename
    out = {
        "module": f.f_globals.get("__name__"),
        "file": filename,
        "line": f.f_lineno,
        "function": f.f_code.co_name,
        "distribution": distribution_of(filename),
    }
    found = model_code_frame(skip + 1) if _model_code else None
    if found is not None and found[1] is not f:
        m = found[1]
        out["model_code"] = {"file": m.f_code.co_filename, "line": m.f_lineno, "function": m.f_code.co_name}
    return out


def _stdlib_file(filename: str) -> bool:
    if filename.startswith("<frozen"):
        return True
    return filename.startswith(_STDLIB) and "site-packages" not in filename and "dist-packages" not in filename


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
        # Reads every installed distribution's metadata (seconds on a big environment): once, not
        # once per thread refused at the same moment.
        with _dists_lock:
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

# filename (or id() of a code object) -> chain of the load that brought the code in. Read by
# acting_chain() on every guarded action outside a load, so the common case (no model code at all)
# is one empty-dict test. Never rebound: guards bind it once.
_model_code: dict = {}
# Folders holding model code (a torch hub folder, a remote-code module folder): modules imported from
# them are model code too. realpath + os.sep -> chain.
_model_folders: dict = {}
_model_folder_order: dict = {}  # folder -> its registration number (of nested folders, the first wins)
# Code objects registered by id() stay alive here, so an id is never reused while registered.
_model_code_objects: list = []


class _Registered:
    code_objects = False  # any code object registered: the stack walk then also looks up id(f_code)


_registered = _Registered()


def register_model_code(filename: str, chain: tuple, real: str | None = None) -> None:
    """Code in ``filename`` came from an artifact: actions it takes, now or at inference, carry ``chain``.
    For a real file outside the interpreter's installation, its folder becomes a model-code folder
    (its sibling modules, imported from it, are model code as well). ``real``: the file's real path,
    when the caller has just resolved it and checked that it is a file (the remote-code guard, which
    hashed it)."""
    chain = tuple(chain)
    _model_code[filename] = chain
    if os.path.isabs(filename) and not filename.startswith("<"):
        known = real is not None
        if not known:
            real = realpath(filename)
        if real != filename:
            _model_code[real] = chain
        folder = os.path.dirname(real)
        if folder + os.sep not in _model_folders and (known or os.path.isfile(real)) and not _installation_path(folder):
            register_model_folder(folder, chain, resolved=True)


def register_model_folder(folder: str, chain: tuple, resolved: bool = False) -> None:
    """Everything under ``folder`` came from an artifact (a torch hub folder, a remote-code snapshot).
    ``resolved``: ``folder`` is a real path already."""
    real = (folder if resolved else realpath(folder)).rstrip(os.sep) + os.sep
    if real == os.sep or _installation_path(real):
        return  # never the filesystem root, the stdlib or site-packages
    if real not in _model_folders:
        _model_folder_order[real] = len(_model_folder_order)
        _model_folders[real] = tuple(chain)


def register_model_code_object(code, chain: tuple) -> None:
    """A code object built from an artifact (a pickled function, marshal, ``types.CodeType``) and the
    functions nested in it: wherever they run, they are model code of ``chain``. Keyed by identity,
    not by ``co_filename``, which such code can set to anything."""
    chain = tuple(chain)
    todo = [code]
    while todo:
        c = todo.pop()
        key = id(c)
        if key in _model_code:
            continue
        _model_code_objects.append(c)
        _model_code[key] = chain
        todo.extend(k for k in c.co_consts if isinstance(k, type(c)))
    _registered.code_objects = True
    if _c_set_by_code is not None:
        _c_set_by_code()  # the C hook's scope test matches id(f_code) from now on


def model_folder_chain(path: str):
    """The chain of the model-code folder holding ``path`` (a real path), or None. Of nested model
    folders, the one registered first. A scan of the folders while there are few, a lookup of each
    of the path's parent folders once a server has loaded many models."""
    folders = _model_folders
    if not folders:
        return None
    if len(folders) <= 16:
        for folder, chain in folders.items():
            if path.startswith(folder):
                return chain
        return None
    found = None
    order = _model_folder_order
    i = path.find(os.sep, 1)
    while i != -1:
        prefix = path[: i + 1]
        if prefix in folders and (found is None or order[prefix] < order[found]):
            found = prefix
        i = path.find(os.sep, i + 1)
    return folders[found] if found is not None else None


def model_code_frame(skip: int = 1):
    """(chain, python frame) of the innermost model code on the stack, or None.

    Frames are matched on their module's ``__file__`` (``f_globals``), not on ``f_code``: on 3.11
    reading ``frame.f_code`` raises an audit event, which would cost every frame of every walk a call
    into each audit hook. Only once code objects rebuilt from a pickle are registered (they carry
    no module of their own) does the walk also look at ``id(f_code)``."""
    if not _model_code:
        return None
    if _c_model_frame is not None:
        return _c_model_frame(_model_code, skip, _registered.code_objects)
    f = sys._getframe(skip)
    get = _model_code.get
    if not _registered.code_objects:
        while f is not None:
            c = get(f.f_globals.get("__file__"))
            if c is not None:
                return c, f
            f = f.f_back
        return None
    while f is not None:
        code = f.f_code
        c = get(f.f_globals.get("__file__")) or get(code.co_filename) or get(id(code))
        if c is not None:
            return c, f
        f = f.f_back
    return None


def acting_chain():
    """The chain an action is attributed to: the current load's, else that of model code on the
    stack, else None (application code, not policed by default; nor an installed library's start-up,
    see _library_start_up)."""
    c = _CHAIN.get()
    if c:
        return None if _library_start_up(frame_at(1), c[-1].entry) else c
    if not _model_code:
        return None
    found = model_code_frame(2)
    if found is None:
        return None
    return None if _library_start_up(frame_at(1), found[1]) else found[0]


# Set by the imports guard: module name -> True when it belongs to a trusted framework (the built-in
# import list: the standard library, torch, numpy, transformers..., and what they depend on).
trusted_start_up = None


def _library_start_up(f, stop) -> bool:
    """True when the action is taken while a trusted framework's module body runs under the import
    machinery, between the load (or model code) and the action: model code importing transformers
    pulls in torch.distributed, which dlopens libc at import, and mpmath, which generates code at
    import. What a framework does to start up is its own. Any other package's import-time actions
    (a dependency phoning home when remote code imports it) stay attributed to the load. Only when
    the walk reaches the load's entry frame or the model code; otherwise it is checked (fail closed)."""
    trusted = trusted_start_up
    if trusted is None:
        return False
    if _c_start_up is not None:
        return _c_start_up(f, stop, _model_code, _registered.code_objects, trusted)
    seen = False
    body = None  # the innermost module body seen so far
    while f is not None:
        if f is stop:
            return seen
        code = f.f_code
        if code.co_filename in _model_code or (_registered.code_objects and id(code) in _model_code):
            return seen
        if code.co_name == "<module>":
            body = f.f_globals.get("__name__")
        elif code.co_name == "exec_module" and code.co_filename.startswith("<frozen importlib") \
                and f.f_back is not None and f.f_back.f_code.co_filename.startswith("<frozen importlib"):
            # the import system running a module body (not code calling exec_module itself); with no
            # body seen yet it is the module being decided right now, which says nothing of who asked
            if body is not None:
                if not (isinstance(body, str) and trusted(body)):
                    return False
                seen = True
                body = None
        f = f.f_back
    return False


# --- the interpreter's installation: where installed, trusted code and data live -----------------

_install_roots = None


def installation_roots() -> tuple:
    """Real paths (with a trailing separator) of the stdlib and site-packages folders."""
    global _install_roots
    if _install_roots is None:
        with internal():  # importing sysconfig opens files: tmtguard's own work, not the load's
            _install_roots = _compute_installation_roots()
    return _install_roots


def _compute_installation_roots() -> tuple:
    import site
    import sysconfig

    roots = set()
    paths = sysconfig.get_paths()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if paths.get(key):
            roots.add(paths[key])
    try:
        roots.update(site.getsitepackages())
    except Exception:
        pass
    user = getattr(site, "USER_SITE", None)
    if user:
        roots.add(user)
    for entry in sys.path:
        if entry and os.path.basename(entry.rstrip(os.sep)) in ("site-packages", "dist-packages"):
            roots.add(entry)
    return tuple(sorted({os.path.realpath(r).rstrip(os.sep) + os.sep for r in roots}))


def _installation_path(path: str) -> bool:
    return (path if path.endswith(os.sep) else path + os.sep).startswith(_install_roots or installation_roots())
