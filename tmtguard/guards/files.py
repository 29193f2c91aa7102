"""The file guard: files guarded loads and model code open (``file.open``) or change (``file.write``).

The PEP 578 ``open`` event (``open``, ``io.open``, ``os.open``, ``pathlib``, ``shutil``...) and the
events of calls that change the filesystem (``os.remove``, ``os.rename``/``replace``, ``os.mkdir``,
``os.rmdir``, ``os.symlink``, ``os.link``, ``os.truncate``, ``os.chmod``, ``os.chown``,
``shutil.rmtree``) are decided before the call, on the real path (symlinks resolved).

* A known secret (``~/.aws/``, ``~/.ssh/``, ``/proc/*/environ``, the Hugging Face token, cloud and
  registry credentials, ``/etc/shadow``; see :data:`SECRETS`) is refused unless a ``files.allow``
  rule names it, whatever folder it is in.
* A read is allowed inside the folders of the artifacts on the chain and of model code, the
  interpreter's installation (stdlib, site-packages), the Hugging Face caches, a few system files
  (``/dev/null``, ``/dev/urandom``, ``/proc/cpuinfo``, zoneinfo...), and ``files.allow``.
* A write (or a change) is allowed inside ``files.allow`` only. Frameworks keep their caches: an
  installed library writing in the Hugging Face or torch hub caches, with no model code on the stack,
  is allowed.

Not checked: the import machinery reading the modules it imports (the import guard decides those),
and file access from native code (``numpy.fromfile`` and C libraries call the C library directly).
"""
from __future__ import annotations

import fnmatch
import operator
import os
import re
import sys
from importlib.machinery import all_suffixes

from .. import decision, provenance
from ..decision import FileViolation
from . import _audit, _scope

_on = False
_policy = None
_folders: dict = {}  # artifact path -> its real folder (+ os.sep)

_chain = _scope._chain
_lazy = _scope._lazy
_model_code = _scope._model_code

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_IMPORT_SUFFIXES = tuple(all_suffixes()) + (".pyc", ".pth")

# (pattern, what it is). ``~`` is the current HOME; ``*`` crosses folders. Matched on the path as
# given and on its real path.
SECRETS = (
    ("~/.aws/*", "AWS credentials"),
    ("~/.ssh/*", "SSH keys"),
    ("~/.gnupg/*", "GnuPG keys"),
    ("~/.netrc", "netrc credentials"),
    ("~/.git-credentials", "git credentials"),
    ("~/.pypirc", "PyPI credentials"),
    ("~/.docker/config.json", "container registry credentials"),
    ("~/.kube/*", "Kubernetes credentials"),
    ("~/.config/gcloud/*", "Google Cloud credentials"),
    ("~/.azure/*", "Azure credentials"),
    ("~/.huggingface/token", "Hugging Face token"),
    ("~/.cache/huggingface/token", "Hugging Face token"),
    ("~/.cache/huggingface/stored_tokens", "Hugging Face tokens"),
    ("$HF_HOME/token", "Hugging Face token"),
    ("$HF_HOME/stored_tokens", "Hugging Face tokens"),
    ("$HF_TOKEN_PATH", "Hugging Face token"),
    ("/proc/*/environ", "the process environment (API keys, tokens)"),
    ("/proc/*/task/*/environ", "the process environment (API keys, tokens)"),
    ("/proc/*/mem", "process memory"),
    ("/etc/shadow", "password hashes"),
    ("/etc/gshadow", "password hashes"),
    ("/run/secrets/*", "mounted secrets"),
    ("/var/run/secrets/*", "mounted secrets (Kubernetes service account token)"),
)

# Read-only system files frameworks commonly read.
SYSTEM_READS = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/shm/", "/etc/localtime",
                "/usr/share/zoneinfo/", "/proc/cpuinfo", "/proc/meminfo", "/proc/self/stat",
                "/proc/self/status", "/sys/devices/system/cpu/", "/sys/fs/cgroup/")


def _quiet() -> bool:
    # Not process-wide: TMTGUARD_PROCESS_WIDE extends the import, process, code and native rules only.
    return not _chain() and not _model_code


def _on_open(args):
    if not _chain() and not _model_code:
        return
    path = args[0]
    if isinstance(path, int) or path is None:
        return  # an open file descriptor: its opening was checked
    flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
    mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
    write = _write_modes.get(mode)
    if write is None:
        write = _write_mode(mode)
    _check(path, write or bool(flags & _WRITE_FLAGS), "open")


_write_modes: dict = {}  # open() mode -> it writes


def _write_mode(mode: str) -> bool:
    write = any(c in mode for c in "wax+")
    if len(_write_modes) < 256:
        _write_modes[mode] = write
    return write


def _changes(operation: str, *positions):
    def handler(args):
        if not _chain() and not _model_code:
            return
        for i in positions:
            if i < len(args) and isinstance(args[i], (str, bytes, os.PathLike)):
                _check(args[i], True, operation)

    return handler


def _check(path, write: bool, operation: str) -> None:
    if not _on or _lazy.internal:
        return
    if not isinstance(path, str):
        try:
            path = os.fsdecode(path)
        except TypeError:
            return
    # 0 here, 1 the event handler, 2 the audit hook's frame, 3 the caller (None: the interpreter
    # itself, with no Python frame)
    f = _getframe(3)
    if path.endswith(_IMPORT_SUFFIXES) and _scope.in_import_machinery(f):
        return  # before the stack walk below: the import guard decides what gets imported
    try:
        # an absolute path with nothing to normalize is its own abspath (most paths a load opens)
        given = path if path[:1] == "/" and "//" not in path and "/./" not in path and "/../" not in path \
            and not path.endswith(_UNNORMALIZED_ENDS) else os.path.abspath(path)
        real = _realpath(given)
        settings = _settings()
        secret = None
        if given.startswith(settings[0]) or (real != given and real.startswith(settings[0])):
            secret = _secret(given, settings) or (_secret(real, settings) if real != given else None)
        # Allowed whoever acts: a read of a non-secret file where every chain may read, a source line
        # for a traceback, an installed framework writing its own cache. No stack walk for these.
        if secret is None:
            if write:
                if _framework_cache_write(real, f):
                    return
            elif _readable_anywhere(real, settings) or _reading_source(f, real):
                return
    except Exception as exc:
        decision.failed("file.open", path, exc, violation=FileViolation)
        return
    chain = _scope.checked_chain(applies_wide=False, verify=False)
    if chain is None:
        return  # application code while model code exists in the process: one stack walk
    _scope.tamper_check()
    try:
        _decide(given, real, secret, write, operation, chain)
    except decision.Violation:
        raise
    except Exception as exc:
        decision.failed("file.open", path, exc, violation=FileViolation)


_realpath = provenance.realpath
_UNNORMALIZED_ENDS = ("/", "/.", "/..")  # with "//", "/./" and "/../": what abspath would change
_getframe = provenance.frame_at


def _decide(given: str, real: str, secret, write: bool, operation: str, chain) -> None:
    """What only the acting chain can allow: a files.allow rule (global or scoped to its innermost
    artifact), a read inside the chain's own artifacts' folders."""
    if _policy.file_allowed(given, chain) is not None or (real != given and _policy.file_allowed(real, chain) is not None):
        return
    if secret is None and not write and _readable_by(real, chain):
        return
    action = "file.open" if operation == "open" else "file.write"
    access = "write" if write else "read"
    if secret is not None:
        rule = f"tried to {access} {given!r}: {secret}; only a files.allow rule naming it permits that"
    elif write:
        rule = f"tried to {'write' if operation == 'open' else operation} {given!r}, and no files.allow rule names it"
    else:
        rule = (f"tried to read {given!r}, outside the artifacts' folders, the interpreter's installation "
                f"and the Hugging Face caches, and no files.allow rule names it")
    detail = {"access": access, "operation": operation}
    if real != given:
        detail["real_path"] = real
    if secret is not None:
        detail["secret"] = secret
    _scope.refuse(action, given, rule, chain, section="files", entry=given, violation=FileViolation,
                  detail=detail, warning=f"it is {secret}" if secret else None)


def _expand(pattern: str) -> str | None:
    if pattern.startswith("$"):
        name, _, rest = pattern[1:].partition("/")
        value = os.environ.get(name)
        if not value:
            return None
        return os.path.join(value, rest) if rest else value
    return os.path.expanduser(pattern) if pattern.startswith("~") else pattern


def _settings() -> tuple:
    """What the file guard checks paths against, for the current environment and Hugging Face
    settings: (secret prefixes, secret matcher, what each secret is, prefixes every chain may read,
    exact paths every chain may read, the Hugging Face caches). Rebuilt only when one of those
    settings changes: os.environ (counted), the Hugging Face modules' constants."""
    key = _settings_key()
    memo = _settings_memo
    if memo[0] == key:
        return memo[1]
    stamp = _stamp()  # before reading anything: a change from here on makes the stamp stale
    caches = hf_caches()
    roots = provenance.installation_roots()
    prefixes, parts, whats = [], [], []
    for pattern, what in SECRETS:
        p = _expand(pattern)
        if p is None:
            continue
        literal = p[:min([i for i in (p.find("*"), p.find("?"), p.find("[")) if i >= 0], default=len(p))]
        prefixes.append(literal[:-1] if literal.endswith("/") and literal == p[:-1] else literal)
        if p.endswith("/*") and "*" not in p[:-2]:
            rx = re.escape(p[:-2]) + r"(?:/.*)?\Z"  # the folder and everything in it
        elif any(c in p for c in "*?["):
            rx = fnmatch.translate(p)
        else:
            rx = re.escape(p) + r"\Z"
        parts.append(f"(?P<s{len(whats)}>{rx})")
        whats.append(what)
    matcher = re.compile("|".join(parts), re.DOTALL).match if parts else (lambda path: None)
    readable = tuple(caches) + tuple(roots) + tuple(p for p in SYSTEM_READS if p.endswith("/"))
    exact = frozenset(p.rstrip("/") for p in SYSTEM_READS)
    value = (tuple(prefixes), matcher, tuple(whats), readable, exact, tuple(caches))
    memo[:] = [key, value, stamp]
    return value


# [key, settings, stamp]. The C hook reads it too (_audit.fast_reads): it lets a read through at once
# when these settings, computed for the environment and modules the stamp names, let it through here
# before any stack walk (no secret prefix, a readable real path).
_settings_memo: list = [None, None, None]


def _stamp() -> tuple:
    """(the os.environ write count object, the _SOURCES values as found in each module's namespace,
    None when missing): the C hook compares it by identity with what it finds on each read."""
    values = []
    modules = sys.modules
    for name, attrs in _SOURCES:
        namespace = getattr(modules.get(name), "__dict__", None) or {}
        values.extend(namespace.get(a) for a in attrs)
    return (provenance.environment_changes[0], tuple(values))


def _secret(path: str, settings=None) -> str | None:
    """What secret ``path`` is (SECRETS), or None. A str.startswith over the patterns' literal
    prefixes first: the one regex runs only for a path that could match."""
    prefixes, matcher, whats = (settings or _settings())[:3]
    if not path.startswith(prefixes):
        return None
    m = matcher(path)
    return whats[int(m.lastgroup[1:])] if m is not None else None


def _readable_anywhere(real: str, settings) -> bool:
    """Readable by every chain: the interpreter's installation, common system files, registered model
    code folders, the Hugging Face caches."""
    return real.startswith(settings[3]) or real in settings[4] or provenance.model_folder_chain(real) is not None


def _readable_by(real: str, chain) -> bool:
    """Readable by this chain: inside the folder of one of its artifacts."""
    for frame in chain:
        folder = _folder_of(frame)
        if folder and (real.startswith(folder) or real == folder.rstrip(os.sep)):
            return True
    return False


def _reading_source(f, real: str) -> bool:
    # tracebacks and warnings show source lines (linecache); a .py file is not a secret
    return f is not None and f.f_globals.get("__name__") in ("linecache", "tokenize") and real.endswith(".py")


def _framework_cache_write(real: str, f) -> bool:
    if not real.startswith(_settings()[5]) and not real.startswith(tuple(torch_hub_caches())):
        return False
    if provenance.model_code_frame(1) is not None:
        return False
    while f is not None and provenance._stdlib_file(provenance.code_of(f).co_filename):
        f = f.f_back
    return f is not None and _scope.installed(provenance.code_of(f).co_filename)


def _folder_of(frame) -> str | None:
    path = getattr(frame, "path", None)
    if not path:
        return None
    folder = _folders.get(path)
    if folder is None:
        real = _realpath(path)
        folder = (real if os.path.isdir(real) else os.path.dirname(real)).rstrip(os.sep) + os.sep
        if folder == os.sep:
            folder = ""  # an artifact at / does not open the whole filesystem
        if len(_folders) > 4096:
            _folders.clear()
        _folders[path] = folder
    return folder or None


_HF_CONSTANTS = ("HF_HOME", "HF_HUB_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_HUB_CACHE")
_hf_constants = operator.attrgetter(*_HF_CONSTANTS)
# What the settings derive from besides os.environ (see _settings_key): module attributes the C
# hook's stamp holds by identity.
_SOURCES = (("huggingface_hub.constants", _HF_CONSTANTS), ("transformers.dynamic_module_utils", ("HF_MODULES_CACHE",)))


def _settings_key() -> tuple:
    """Everything the file guard's settings and hf_caches() derive from, read in one pass."""
    modules = sys.modules
    constants = modules.get("huggingface_hub.constants")
    if constants is not None:
        try:
            constants = _hf_constants(constants)
        except AttributeError:
            constants = tuple(getattr(constants, n, None) for n in _HF_CONSTANTS)
    # the environment by its change count (tamper's os.putenv / os.unsetenv handler counts every
    # os.environ write), not by reading a dozen variables on every open
    return (provenance.environment_changes[0], constants,
            getattr(modules.get("transformers.dynamic_module_utils"), "HF_MODULES_CACHE", None))


def hf_caches() -> list:
    """The Hugging Face cache folders (real paths, with a trailing separator): from the environment
    and, once imported, from huggingface_hub and transformers themselves (they read it at import).
    Recomputed only when one of those settings changes."""
    return _memo(_hf_key_memo, _settings_key(), _hf_caches)


_hf_key_memo: dict = {}


def _memo(memo: dict, key, compute, *args):
    """memo[key], computed once by compute(*args); a small cache, emptied when it holds 64 entries."""
    value = memo.get(key)
    if value is None:
        value = compute(*args)
        if len(memo) >= 64:
            memo.clear()
        memo[key] = value
    return value


def _real_folders(paths) -> list:
    return [os.path.realpath(p).rstrip(os.sep) + os.sep for p in paths]


def _hf_caches() -> list:
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    found = {home, env.get("HF_HUB_CACHE"), env.get("HUGGINGFACE_HUB_CACHE"), env.get("TRANSFORMERS_CACHE"),
             env.get("HF_MODULES_CACHE"), env.get("HF_ASSETS_CACHE"), env.get("HF_DATASETS_CACHE")}
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        for name in _HF_CONSTANTS:
            found.add(getattr(constants, name, None))
    dynamic = sys.modules.get("transformers.dynamic_module_utils")
    if dynamic is not None:
        found.add(getattr(dynamic, "HF_MODULES_CACHE", None))
    key = frozenset(str(p) for p in found if p)
    # realpath of each folder once per set of folders (an unrelated os.environ write changes the key above)
    return _memo(_hf_cache_memo, key, _real_folders, key)


_hf_cache_memo: dict = {}


def torch_hub_caches() -> list:
    hub = sys.modules.get("torch.hub")
    if hub is None:
        return []
    # hub.get_dir() reads the environment: recomputed when torch.hub.set_dir() or os.environ changes
    key = (getattr(hub, "_hub_dir", None), provenance.environment_changes[0])
    try:
        return _memo(_torch_hub_memo, key, lambda: _real_folders([hub.get_dir()]))
    except Exception:
        return []


_torch_hub_memo: dict = {}


_EVENTS = {
    "open": _on_open,
    "os.remove": _changes("remove", 0),
    "os.rename": _changes("rename", 0, 1),
    "os.rmdir": _changes("rmdir", 0),
    "os.mkdir": _changes("mkdir", 0),
    "os.symlink": _changes("symlink", 1),
    "os.link": _changes("link", 1),
    "os.truncate": _changes("truncate", 0),
    "os.chmod": _changes("chmod", 0),
    "os.chown": _changes("chown", 0),
    "shutil.rmtree": _changes("rmtree", 0),
}


def install(policy) -> None:
    global _on, _policy
    _policy = policy
    _folders.clear()
    _settings_memo[:] = [None, None, None]  # the environment may have changed while tmtguard was off
    _hf_key_memo.clear()
    for event, handler in _EVENTS.items():
        _audit.register(event, handler, scope=_audit.MODEL)
    _audit.fast_reads(provenance.environment_changes, _SOURCES, _settings_memo)
    _on = True


def uninstall() -> None:
    global _on
    _on = False
    _audit.fast_reads(None)
    for event in _EVENTS:
        _audit.unregister(event)
