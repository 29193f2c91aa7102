"""Offline Hugging Face fixtures for tmtguard tests: a hand-made hub cache and local model folders.

Importing this module needs nothing beyond the standard library (no pytest, torch or transformers).
Only ``tiny_bert_folder`` imports torch and transformers (lazily, in the calling process); the custom
model weights are written as safetensors in pure Python (byte-identical to safetensors.torch.save).

Typical use (load in a FRESH subprocess: transformers and huggingface_hub read the cache locations at
import time, and remote code leaves state behind in sys.modules / sys.path / the Auto registries)::

    info = tiny_custom_model(cache_dir)                  # acme/tiny-model, code in the same repo
    env = env_for(cache_dir, modules_dir)                # HF_HUB_CACHE, HF_MODULES_CACHE, offline flags
    proc = run_python("from transformers import AutoModel; ...", env)

Layout written by make_repo (no network, usable with HF_HUB_OFFLINE=1)::

    <cache>/models--<org>--<name>/refs/<revision_name>        -> 40-hex commit id (no newline)
    <cache>/models--<org>--<name>/snapshots/<commit>/<files>  (plain files; symlinks=True writes
                                                              blobs/<sha256> + relative symlinks like
                                                              the real cache)

Commit ids are sha1 over (repo_id, revision_name, sorted file names and bytes): reproducible.

======================================================================================================
transformers 5.24.0 remote-code internals, verified by reading the installed sources
(site-packages/transformers, huggingface_hub 2.4.0, torch 2.13.0+cpu, CPython 3.11.7)
======================================================================================================

All in ``transformers/dynamic_module_utils.py`` (line numbers are 5.24.0's):

* ``get_class_from_dynamic_module(class_reference, pretrained_model_name_or_path, cache_dir=None,
  force_download=False, proxies=None, token=None, revision=None, local_files_only=False, repo_type=None,
  code_revision=None, **kwargs) -> type``  (l.518).
  If ``"--" in class_reference``: ``repo_id, class_reference = class_reference.split("--")`` (the
  TRANSITIVE case, code from another repo); then ``module_file, class_name = class_reference.split(".")``.
  ``if code_revision is None and pretrained_model_name_or_path == repo_id: code_revision = revision`` --
  so for another repo, code_revision stays None and the code is read at that repo's DEFAULT branch
  ("main"), whatever revision was pinned for the model. Then
  ``get_cached_module_file(repo_id, module_file + ".py", ..., revision=code_revision, ...)`` and
  ``get_class_in_module(class_name, final_module, force_reload=force_download)``.

* ``get_cached_module_file(pretrained_model_name_or_path, module_file, cache_dir=None,
  force_download=False, proxies=None, token=None, revision=None, local_files_only=False, repo_type=None,
  **deprecated_kwargs) -> str`` (l.346). Returns a path RELATIVE to HF_MODULES_CACHE, e.g.
  ``transformers_modules/acme/tiny_hyphen_model/<commit>/modeling_tiny.py``.
  - ``is_offline_mode()`` (huggingface_hub) forces ``local_files_only=True``.
  - Resolves the file with ``transformers.utils.cached_file`` (hub: the snapshot path; local dir: the
    file in the folder).
  - l.439: ``modules_needed = check_imports(resolved_module_file)`` runs on the SNAPSHOT/FOLDER file,
    BEFORE any copy and before the module executes.
  - Hub repo: submodule = ``_sanitize_module_name(org)/_sanitize_module_name(name)/<commit>`` where
    commit = ``extract_commit_hash(resolved_file)`` (regex ``snapshots/([^/]+)/`` in
    transformers/utils/hub.py). The copy ``shutil.copyfile(resolved_module_file, submodule_path /
    module_file)`` (l.483) happens ONLY IF the target does not exist (an existing, possibly tampered
    copy is never refreshed nor compared). Relative imports (the list returned by check_imports) are
    fetched by a RECURSIVE call ``get_cached_module_file(repo, "<dir>/<name>.py", revision=revision,
    ...)`` only if ``<name>.py`` is missing next to the copy -- so check_imports runs on each of them too.
  - Local folder: submodule = ``_sanitize_module_name(basename(normpath(path))) / <hash16>`` where
    hash16 = ``_compute_local_source_files_hash`` (l.314): sha256 over sorted (posix path relative to
    the resolved folder, bytes) of the module file AND its recursive relative imports, first 16 hex.
    Copies (l.459 module file, l.469 relative imports) are made if missing OR different
    (``filecmp.cmp``). NB: configuration_tiny.py loaded on its own (AutoConfig) and modeling_tiny.py
    (which imports .configuration_tiny) land in DIFFERENT hash folders, so the local folder case has
    two copies of configuration_tiny.py (and two distinct TinyConfig classes).
  - ``create_dynamic_module`` / ``init_hf_modules`` (l.85-121): ``sys.path.append(HF_MODULES_CACHE)``
    once, create ``__init__.py`` in every package level, ``importlib.invalidate_caches()``.

* ``check_imports(filename) -> list[str]`` (l.231): ``get_imports`` parses the file with ``ast`` and
  collects top-level module names of absolute ``import x`` / ``from x import y`` statements (skipping
  anything inside ``try:`` blocks and inside ``if is_xxx_available():`` blocks), then
  ``importlib.import_module(name)`` for EACH of them -- third-party module code runs here, before the
  remote file itself. Missing ("No module named") -> ImportError listing packages; other ImportErrors
  re-raised. Returns ``get_relative_imports(filename)`` (regexes ``^\\s*import\\s+\\.(\\S+)`` and
  ``^\\s*from\\s+\\.(\\S+)\\s+import``; ``from . import x`` is NOT matched).

* ``get_class_in_module(class_name, module_path, *, force_reload=False) -> type`` (l.266). Module name:
  ``os.path.normpath(module_path)``, ``.removesuffix(".py")``, ``os.path.sep`` -> ``"."``, e.g.
  ``transformers_modules.acme.tiny_hyphen_model.<commit>.modeling_tiny`` (org/name sanitized by
  ``_sanitize_module_name``: ``.`` -> ``_dot_``, ``-`` -> ``_hyphen_``, leading digit -> ``_`` prefix;
  the 40-hex COMMIT component is NOT sanitized and may start with a digit). File =
  ``Path(HF_MODULES_CACHE) / module_path`` (the COPY, not the snapshot). Under
  ``with _HF_REMOTE_CODE_LOCK:`` (l.82, ``threading.Lock()`` -- plain, NOT reentrant: do not re-enter
  from a hook running inside exec_module) it builds ``importlib.util.spec_from_file_location(name,
  location=module_file)``, hashes the copy + its relative-import files (sha256), puts a new module in
  ``sys.modules[name]`` before executing, and runs ``module_spec.loader.exec_module(module)`` (l.309)
  unless ``module.__transformers_module_hash__`` already equals the hash; returns
  ``getattr(module, class_name)``. Relative imports inside the remote file (``from .configuration_tiny
  import ...``) go through the normal import system (parent packages found on sys.path via
  HF_MODULES_CACHE), not through get_class_in_module.

* ``resolve_trust_remote_code(trust_remote_code, model_name, has_local_code, has_remote_code,
  error_message=None, upstream_repo=None)`` (l.714): ``None`` prompts with ``input()`` under
  SIGALRM for ``TIME_OUT_REMOTE_CODE = 15`` s (module global, l.711; 0 -> raise at once). Pass
  ``trust_remote_code`` explicitly.

Modules that bind these functions BY NAME at import (``from ... import``), so patching the
``dynamic_module_utils`` attribute alone does not reach them; patch each binding site, or patch the
callees that are looked up through ``dynamic_module_utils`` globals at call time (get_cached_module_file,
get_class_in_module, check_imports are called by name from get_class_from_dynamic_module /
get_cached_module_file inside dynamic_module_utils):

    get_class_from_dynamic_module (+ resolve_trust_remote_code):
      transformers/models/auto/auto_factory.py        (from_config l.227, from_pretrained l.381)
      transformers/models/auto/configuration_auto.py  (AutoConfig.from_pretrained l.424)
      transformers/models/auto/tokenization_auto.py   (l.968)
      transformers/models/auto/feature_extraction_auto.py (l.366)
      transformers/models/auto/image_processing_auto.py   (l.701)
      transformers/models/auto/processing_auto.py     (l.342)
      transformers/models/auto/video_processing_auto.py   (l.430)
      transformers/pipelines/__init__.py              (get_class_from_dynamic_module only, l.1064)
    get_cached_module_file + get_class_in_module (+ resolve_trust_remote_code, check_python_requirements):
      transformers/generation/utils.py  (custom_generate/generate.py loader, ~l.657-663; executes
      ``get_class_in_module("generate", module)``)
    resolve_trust_remote_code only: transformers/exporters/base.py
    custom_object_save only (saving, not loading): configuration_utils, modeling_utils,
      tokenization_utils_base, feature_extraction_utils, image_processing_base, processing_utils,
      video_processing_utils, pipelines/base.py, distributed/mixin.py
No other ``spec_from_file_location``/``exec_module`` of model code in transformers 5.24 besides
dynamic_module_utils (integrations/integration_utils.py loads the *datasets* modules package;
utils/import_utils.py is transformers' own lazy loader).

Other verified facts:
* ``HF_MODULES_CACHE = os.getenv("HF_MODULES_CACHE", os.path.join(constants.HF_HOME, "modules"))``
  (transformers/utils/hub.py l.108) and ``TRANSFORMERS_DYNAMIC_MODULE_NAME = "transformers_modules"``;
  huggingface_hub.constants reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE)
  at import -> set the env BEFORE importing transformers/huggingface_hub.
* 5.24 resolves ``revision`` ONCE per from_pretrained (``transformers.utils.hub.resolve_revision`` ->
  ``HfApi.resolve_revision``, offline it reads ``refs/<name>``) and passes a
  ``huggingface_hub.ResolvedRevision`` (a str subclass whose value is the requested name, ``.resolved``
  the commit) down; get_cached_module_file uses ``revision.initial`` for its "new version" warning.
* AutoModel.from_pretrained/from_config then ``cls.register(config.__class__, model_class,
  exist_ok=True)``; register only compares ``model_class.config_class.__name__`` to the config class's
  __name__ -> a remote model class must define ``config_class``. The registry
  (``_LazyAutoMapping._extra_content``) is keyed by the config CLASS object. Observed call sequence
  (counting wrappers): 1st ``AutoModel.from_pretrained("acme/tiny-model")`` -> configuration_auto's
  get_class_from_dynamic_module(config) -> get_cached_module_file -> check_imports ->
  get_class_in_module, then auto_factory's get_class_from_dynamic_module(model) -> same chain (plus a
  recursive get_cached_module_file + check_imports per relative import not yet copied). A 2nd load of
  the SAME repo in the same process still goes through the config chain (exec_module skipped: hash hit)
  but NOT through auto_factory's get_class_from_dynamic_module: ``type(config)`` is registered, so
  ``explicit_local_code`` is True and the registered class is used directly. ANOTHER repo with the same
  model_type but its own remote config class does run its own code (different config class object).
* ``from transformers import AutoConfig`` imports torch when torch is installed
  (configuration_utils -> modeling_rope_utils -> torch); remote AutoConfig code still works in an
  environment where torch is absent (see ``site_without``; tested in tests/test_hubfixtures.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

__all__ = [
    "DEFAULT_COMMIT_SALT",
    "commit_id_for",
    "make_repo",
    "repo_folder",
    "snapshot_dir",
    "sanitize_module_name",
    "hub_module_relpath",
    "hub_module_name",
    "local_module_relpath",
    "local_module_name",
    "configuration_source",
    "modeling_source",
    "helpers_source",
    "tiny_weights",
    "safetensors_bytes",
    "expected_output",
    "tiny_custom_model",
    "tiny_custom_config",
    "local_custom_folder",
    "tiny_bert_folder",
    "env_for",
    "clean_environ",
    "run_python",
    "start_python",
    "site_without",
]

DEFAULT_COMMIT_SALT = b"tmtguard-hubfixture-v1"

CONFIG_CLASS = "TinyConfig"
MODEL_CLASS = "TinyModel"
CONFIG_MODULE = "configuration_tiny"
MODELING_MODULE = "modeling_tiny"
HELPERS_MODULE = "helpers_tiny"
HELPER_MARKER = "helpers_tiny loaded"
DEFAULT_MODEL_TYPE = "tmt-tiny"
HIDDEN_SIZE = 4
OUT_SIZE = 2


# --------------------------------------------------------------------------------------------------
# The hub cache
# --------------------------------------------------------------------------------------------------

def _as_bytes(content: str | bytes) -> bytes:
    return content.encode("utf-8") if isinstance(content, str) else bytes(content)


def commit_id_for(repo_id: str, files: dict[str, str | bytes], revision_name: str = "main") -> str:
    """Deterministic 40-hex 'commit id' for a set of files (sha1 over names and contents)."""
    h = hashlib.sha1(DEFAULT_COMMIT_SALT)
    for part in (repo_id, revision_name):
        h.update(b"\0" + part.encode("utf-8"))
    for name in sorted(files):
        data = _as_bytes(files[name])
        h.update(b"\0F" + name.encode("utf-8") + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def repo_folder(cache_dir: str | os.PathLike, repo_id: str, repo_type: str = "model") -> Path:
    """``<cache>/models--org--name`` (same naming as huggingface_hub.file_download.repo_folder_name)."""
    return Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def snapshot_dir(cache_dir: str | os.PathLike, repo_id: str, commit: str, repo_type: str = "model") -> Path:
    return repo_folder(cache_dir, repo_id, repo_type) / "snapshots" / commit


def make_repo(
    cache_dir: str | os.PathLike,
    repo_id: str,
    files: dict[str, str | bytes],
    revision_name: str = "main",
    *,
    repo_type: str = "model",
    symlinks: bool = False,
) -> str:
    """Write ``files`` as a snapshot of ``repo_id`` in the hub cache and point ``refs/<revision_name>`` at it.

    ``files`` maps repo-relative posix paths (may contain ``/``) to text or bytes. Returns the 40-hex commit.
    With ``symlinks=True`` the files are stored in ``blobs/<sha256>`` and the snapshot holds relative
    symlinks, as huggingface_hub does; by default the snapshot holds plain files (also accepted offline).
    Rewriting a repo with other content adds a new snapshot and moves the ref; old snapshots stay.
    """
    if "/" not in repo_id:
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    commit = commit_id_for(repo_id, files, revision_name)
    root = repo_folder(cache_dir, repo_id, repo_type)
    snap = root / "snapshots" / commit
    for name, content in files.items():
        data = _as_bytes(content)
        target = snap / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        if symlinks:
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            target.symlink_to(os.path.relpath(blob, target.parent))
        else:
            target.write_bytes(data)
    ref = root / "refs" / revision_name
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # huggingface_hub writes the bare hash, no newline
    return commit


# --------------------------------------------------------------------------------------------------
# Where transformers will copy / name the remote modules
# --------------------------------------------------------------------------------------------------

def sanitize_module_name(name: str) -> str:
    """Mirror of transformers.dynamic_module_utils._sanitize_module_name (5.24)."""
    new = name.replace(".", "_dot_").replace("-", "_hyphen_")
    if new and new[0].isdigit():
        new = f"_{new}"
    return new


def hub_module_relpath(repo_id: str, commit: str, module: str) -> str:
    """Path relative to HF_MODULES_CACHE of the copy get_cached_module_file makes for a hub repo."""
    org, name = repo_id.split("/")
    return "/".join(["transformers_modules", sanitize_module_name(org), sanitize_module_name(name),
                     commit, f"{module}.py"])


def hub_module_name(repo_id: str, commit: str, module: str) -> str:
    return hub_module_relpath(repo_id, commit, module).removesuffix(".py").replace("/", ".")


def _relative_imports(source: str) -> list[str]:
    found = re.findall(r"^\s*import\s+\.(\S+)\s*$", source, flags=re.MULTILINE)
    found += re.findall(r"^\s*from\s+\.(\S+)\s+import", source, flags=re.MULTILINE)
    return sorted(set(found))


def _local_source_hash(folder: Path, module_file: str) -> str:
    """Mirror of transformers.dynamic_module_utils._compute_local_source_files_hash (5.24)."""
    folder = Path(folder).resolve()
    todo, seen = [module_file], []
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.append(rel)
        src = (folder / rel).read_text(encoding="utf-8")
        todo.extend(f"{m}.py" for m in _relative_imports(src))
    h = hashlib.sha256()
    for rel in sorted(seen):
        h.update(rel.encode("utf-8"))
        h.update((folder / rel).read_bytes())
    return h.hexdigest()[:16]


def local_module_relpath(folder: str | os.PathLike, module: str) -> str:
    """Path relative to HF_MODULES_CACHE of the copy made for ``from_pretrained(<folder>)``."""
    folder = Path(folder)
    base = sanitize_module_name(os.path.basename(os.path.normpath(folder)))
    return "/".join(["transformers_modules", base, _local_source_hash(folder, f"{module}.py"), f"{module}.py"])


def local_module_name(folder: str | os.PathLike, module: str) -> str:
    return local_module_relpath(folder, module).removesuffix(".py").replace("/", ".")


# --------------------------------------------------------------------------------------------------
# Sources of the tiny custom model
# --------------------------------------------------------------------------------------------------

def configuration_source(model_type: str = DEFAULT_MODEL_TYPE, extra: str = "") -> str:
    """configuration_tiny.py: an old-style (``__init__``) PretrainedConfig subclass, as hub repos write them.

    ``extra`` is inserted at module top level after the imports (before the class).
    """
    return f'''"""Tiny custom configuration (tmtguard test fixture)."""
from transformers import PretrainedConfig

{extra}

class {CONFIG_CLASS}(PretrainedConfig):
    model_type = {model_type!r}

    def __init__(self, hidden_size={HIDDEN_SIZE}, out_size={OUT_SIZE}, **kwargs):
        self.hidden_size = hidden_size
        self.out_size = out_size
        super().__init__(**kwargs)
'''


def helpers_source(extra: str = "") -> str:
    return f'''"""Helper module imported relatively by modeling_tiny.py (tmtguard test fixture)."""
HELPER_MARKER = {HELPER_MARKER!r}

{extra}

def tiny_identity(x):
    return x
'''


def modeling_source(extra: str = "", tail: str = "", with_helper: bool = False) -> str:
    """modeling_tiny.py: a PreTrainedModel subclass with one tiny Linear and a real forward.

    * ``extra`` is inserted at module top level right after the imports (e.g. ``import evilmod``: note
      that transformers' check_imports imports every top-level absolute import BEFORE running the file).
    * ``tail`` is appended at the end of the module (e.g. to patch ``TinyModel.forward``).
    * If the module defines a top-level ``tmt_on_forward(model, x)`` (via ``extra`` or ``tail``),
      ``forward`` calls it first: an easy way to run code at inference time.
    * ``with_helper=True`` adds ``from .helpers_tiny import HELPER_MARKER, tiny_identity`` (a second
      relative import besides ``.configuration_tiny``); the model then has ``helper_marker``.
    """
    helper_import = (f"from .{HELPERS_MODULE} import HELPER_MARKER, tiny_identity\n" if with_helper else "")
    helper_init = ("        self.helper_marker = HELPER_MARKER\n" if with_helper
                   else "        self.helper_marker = None\n")
    helper_fwd = ("        y = tiny_identity(y)\n" if with_helper else "")
    return f'''"""Tiny custom model (tmtguard test fixture)."""
import torch
from torch import nn
from transformers import PreTrainedModel

from .{CONFIG_MODULE} import {CONFIG_CLASS}
{helper_import}
{extra}

class TinyPreTrainedModel(PreTrainedModel):
    config_class = {CONFIG_CLASS}
    base_model_prefix = "tiny"
    main_input_name = "x"

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.data.zero_()
            if module.bias is not None:
                module.bias.data.zero_()


class {MODEL_CLASS}(TinyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.linear = nn.Linear(config.hidden_size, config.out_size)
{helper_init}        self.post_init()

    def forward(self, x):
        hook = globals().get("tmt_on_forward")
        if hook is not None:
            hook(self, x)
        y = self.linear(x)
{helper_fwd}        return y

{tail}
'''


def tiny_weights(seed: int = 0, hidden_size: int = HIDDEN_SIZE, out_size: int = OUT_SIZE) -> dict[str, list]:
    """Seeded pseudo-random weights as plain lists (pure Python: the same on every torch version)."""
    rng = random.Random(seed)
    weight = [[round(rng.uniform(-1.0, 1.0), 4) for _ in range(hidden_size)] for _ in range(out_size)]
    bias = [round(rng.uniform(-1.0, 1.0), 4) for _ in range(out_size)]
    return {"linear.weight": weight, "linear.bias": bias}


def expected_output(weights: dict[str, list], x: list[float]) -> list[float]:
    """y = W x + b for one input vector, in pure Python (compare with a tolerance)."""
    return [sum(w * xi for w, xi in zip(row, x)) + b
            for row, b in zip(weights["linear.weight"], weights["linear.bias"])]


def safetensors_bytes(tensors: dict[str, list], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize float32 tensors given as nested lists to the safetensors format, in pure Python.

    Byte-identical to ``safetensors.torch.save`` for float32 tensors (compact JSON header with sorted
    keys, ``__metadata__`` first, space-padded to 8 bytes; data little-endian, tensors in name order),
    so building fixtures needs neither torch nor safetensors.
    """
    import struct

    def flat(v):
        return [x for item in v for x in flat(item)] if isinstance(v, list) else [float(v)]

    def shape(v):
        return [len(v)] + shape(v[0]) if isinstance(v, list) else []

    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    chunks, offset = [], 0
    for name in sorted(tensors):
        values = flat(tensors[name])
        data = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape(tensors[name]), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def _safetensors_bytes(weights: dict[str, list]) -> bytes:
    return safetensors_bytes(weights, metadata={"format": "pt"})


def _config_json(model_type: str, auto_map: dict[str, str], **fields) -> str:
    cfg = {
        "architectures": [MODEL_CLASS] if "AutoModel" in auto_map else None,
        "auto_map": auto_map,
        "model_type": model_type,
        "hidden_size": HIDDEN_SIZE,
        "out_size": OUT_SIZE,
        "dtype": "float32",
    }
    if cfg["architectures"] is None:
        del cfg["architectures"]
    cfg.update(fields)
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def _code_files(model_type, extra_modeling_source, extra_modeling_tail, extra_configuration_source,
                with_helper, extra_helpers_source="") -> dict[str, str]:
    files = {
        f"{CONFIG_MODULE}.py": configuration_source(model_type, extra_configuration_source),
        f"{MODELING_MODULE}.py": modeling_source(extra_modeling_source, extra_modeling_tail, with_helper),
    }
    if with_helper:
        files[f"{HELPERS_MODULE}.py"] = helpers_source(extra_helpers_source)
    return files


def _module_list(with_helper: bool) -> list[str]:
    return [CONFIG_MODULE, MODELING_MODULE] + ([HELPERS_MODULE] if with_helper else [])


def tiny_custom_model(
    cache_dir: str | os.PathLike,
    repo_id: str = "acme/tiny-model",
    code_repo: str | None = None,
    extra_modeling_source: str = "",
    *,
    extra_modeling_tail: str = "",
    extra_configuration_source: str = "",
    extra_helpers_source: str = "",
    with_helper: bool = False,
    model_type: str = DEFAULT_MODEL_TYPE,
    seed: int = 0,
    revision_name: str = "main",
    code_revision_name: str = "main",
    extra_files: dict[str, str | bytes] | None = None,
    modules_dir: str | os.PathLike | None = None,
    symlinks: bool = False,
) -> dict:
    """A real tiny remote-code model in the hub cache: config.json (auto_map AutoConfig + AutoModel),
    configuration_tiny.py, modeling_tiny.py (+ helpers_tiny.py), model.safetensors.

    With ``code_repo="other/code"`` the .py files go to that repo (ref ``code_revision_name``; transformers
    reads it at "main") and the auto_map entries read ``"other/code--modeling_tiny.TinyModel"``.
    ``extra_files`` are added to the model repo (e.g. a pickle ``pytorch_model.bin``).

    Returns a dict: repo_id, commit, code_repo, code_commit, auto_map, class names, weights (plain
    lists), snapshot_files {name: Path}, code_files {name: Path} (where the .py files live),
    module_relpaths / module_names {module: ...} of the HF_MODULES_CACHE copies transformers will make,
    and module_paths {module: Path} when ``modules_dir`` is given.
    """
    weights = tiny_weights(seed)
    prefix = f"{code_repo}--" if code_repo else ""
    auto_map = {
        "AutoConfig": f"{prefix}{CONFIG_MODULE}.{CONFIG_CLASS}",
        "AutoModel": f"{prefix}{MODELING_MODULE}.{MODEL_CLASS}",
    }
    code = _code_files(model_type, extra_modeling_source, extra_modeling_tail, extra_configuration_source,
                       with_helper, extra_helpers_source)
    model_files: dict[str, str | bytes] = {
        "config.json": _config_json(model_type, auto_map),
        "model.safetensors": _safetensors_bytes(weights),
    }
    if code_repo is None:
        model_files.update(code)
    model_files.update(extra_files or {})
    commit = make_repo(cache_dir, repo_id, model_files, revision_name, symlinks=symlinks)
    snap = snapshot_dir(cache_dir, repo_id, commit)
    if code_repo is not None:
        code_commit = make_repo(cache_dir, code_repo, code, code_revision_name, symlinks=symlinks)
        code_snap = snapshot_dir(cache_dir, code_repo, code_commit)
    else:
        code_commit, code_snap = commit, snap
    code_owner = code_repo or repo_id
    modules = _module_list(with_helper)
    info = {
        "repo_id": repo_id,
        "commit": commit,
        "revision_name": revision_name,
        "code_repo": code_owner,
        "code_commit": code_commit,
        "transitive": code_repo is not None,
        "auto_map": auto_map,
        "model_type": model_type,
        "config_class": CONFIG_CLASS,
        "model_class": MODEL_CLASS,
        "weights": weights,
        "snapshot_dir": snap,
        "code_snapshot_dir": code_snap,
        "snapshot_files": {name: snap / name for name in model_files},
        "code_files": {name: code_snap / name for name in code},
        "module_relpaths": {m: hub_module_relpath(code_owner, code_commit, m) for m in modules},
        "module_names": {m: hub_module_name(code_owner, code_commit, m) for m in modules},
    }
    if modules_dir is not None:
        info["module_paths"] = {m: Path(modules_dir) / p for m, p in info["module_relpaths"].items()}
    return info


def tiny_custom_config(
    cache_dir: str | os.PathLike,
    repo_id: str = "acme/tiny-config",
    code_repo: str | None = None,
    extra_configuration_source: str = "",
    *,
    model_type: str = "tmt-tiny-config",
    revision_name: str = "main",
    modules_dir: str | os.PathLike | None = None,
    symlinks: bool = False,
) -> dict:
    """Config-only remote code: config.json with ``auto_map = {"AutoConfig": ...}`` and configuration_tiny.py.

    ``AutoConfig.from_pretrained(repo_id, trust_remote_code=True)`` runs the remote configuration code; it
    needs no torch (configuration_tiny.py imports only ``transformers``).
    """
    prefix = f"{code_repo}--" if code_repo else ""
    auto_map = {"AutoConfig": f"{prefix}{CONFIG_MODULE}.{CONFIG_CLASS}"}
    code = {f"{CONFIG_MODULE}.py": configuration_source(model_type, extra_configuration_source)}
    files: dict[str, str | bytes] = {"config.json": _config_json(model_type, auto_map)}
    if code_repo is None:
        files.update(code)
    commit = make_repo(cache_dir, repo_id, files, revision_name, symlinks=symlinks)
    snap = snapshot_dir(cache_dir, repo_id, commit)
    if code_repo is not None:
        code_commit = make_repo(cache_dir, code_repo, code, "main", symlinks=symlinks)
    else:
        code_commit = commit
    code_owner = code_repo or repo_id
    info = {
        "repo_id": repo_id,
        "commit": commit,
        "code_repo": code_owner,
        "code_commit": code_commit,
        "transitive": code_repo is not None,
        "auto_map": auto_map,
        "model_type": model_type,
        "config_class": CONFIG_CLASS,
        "snapshot_dir": snap,
        "snapshot_files": {name: snap / name for name in files},
        "code_files": {name: snapshot_dir(cache_dir, code_owner, code_commit) / name for name in code},
        "module_relpaths": {CONFIG_MODULE: hub_module_relpath(code_owner, code_commit, CONFIG_MODULE)},
        "module_names": {CONFIG_MODULE: hub_module_name(code_owner, code_commit, CONFIG_MODULE)},
    }
    if modules_dir is not None:
        info["module_paths"] = {m: Path(modules_dir) / p for m, p in info["module_relpaths"].items()}
    return info


def local_custom_folder(
    path: str | os.PathLike,
    extra_modeling_source: str = "",
    *,
    extra_modeling_tail: str = "",
    extra_configuration_source: str = "",
    extra_helpers_source: str = "",
    with_helper: bool = False,
    model_type: str = "tmt-tiny-local",
    seed: int = 0,
    extra_files: dict[str, str | bytes] | None = None,
    modules_dir: str | os.PathLike | None = None,
) -> dict:
    """A local folder with custom code, for ``AutoModel.from_pretrained("./dir", trust_remote_code=True)``.

    The copies transformers makes live in ``transformers_modules/<sanitized folder name>/<hash16>/``;
    the hash covers the module file and its relative imports, so configuration_tiny.py (AutoConfig) and
    modeling_tiny.py (AutoModel) get different folders: see ``module_relpaths``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = tiny_weights(seed)
    auto_map = {"AutoConfig": f"{CONFIG_MODULE}.{CONFIG_CLASS}", "AutoModel": f"{MODELING_MODULE}.{MODEL_CLASS}"}
    files: dict[str, str | bytes] = {
        "config.json": _config_json(model_type, auto_map),
        "model.safetensors": _safetensors_bytes(weights),
    }
    files.update(_code_files(model_type, extra_modeling_source, extra_modeling_tail, extra_configuration_source,
                             with_helper, extra_helpers_source))
    files.update(extra_files or {})
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(_as_bytes(content))
    modules = _module_list(with_helper)
    # AutoConfig loads configuration_tiny.py on its own; AutoModel loads modeling_tiny.py, whose folder
    # also receives configuration_tiny.py (+ helpers_tiny.py) as relative imports.
    relpaths = {
        "config:" + CONFIG_MODULE: local_module_relpath(path, CONFIG_MODULE),
        MODELING_MODULE: local_module_relpath(path, MODELING_MODULE),
    }
    model_dir = relpaths[MODELING_MODULE].rsplit("/", 1)[0]
    for m in modules:
        if m != MODELING_MODULE:
            relpaths[m] = f"{model_dir}/{m}.py"
    info = {
        "path": path,
        "auto_map": auto_map,
        "model_type": model_type,
        "config_class": CONFIG_CLASS,
        "model_class": MODEL_CLASS,
        "weights": weights,
        "files": {name: path / name for name in files},
        "module_relpaths": relpaths,
        "module_names": {k: v.removesuffix(".py").replace("/", ".") for k, v in relpaths.items()},
    }
    if modules_dir is not None:
        info["module_paths"] = {m: Path(modules_dir) / p for m, p in relpaths.items()}
    return info


def tiny_bert_folder(path: str | os.PathLike, *, seed: int = 0, with_tokenizer: bool = True) -> dict:
    """A small standard BERT (no remote code) saved with save_pretrained (safetensors) into ``path``.

    Imports torch and transformers in the CALLING process (call it from a fixture, not from a process
    whose hub environment matters). ``with_tokenizer`` also writes a tiny WordPiece vocab + tokenizer.
    """
    import torch  # lazy
    from transformers import BertConfig, BertModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    model.save_pretrained(path)
    info = {"path": path, "model_type": "bert", "config": config.to_dict(), "tokenizer": False}
    if with_tokenizer:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        words = [f"w{i}" for i in range(config.vocab_size - len(specials) - 26)] + [chr(97 + i) for i in range(26)]
        (path / "vocab.txt").write_text("\n".join(specials + words) + "\n", encoding="utf-8")
        try:
            from transformers import BertTokenizer

            BertTokenizer(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
            info["tokenizer"] = True
        except Exception as exc:  # the model fixture stays usable without a tokenizer
            info["tokenizer_error"] = repr(exc)
    info["files"] = sorted(p.name for p in path.iterdir())
    return info


# --------------------------------------------------------------------------------------------------
# Environment and subprocess helpers
# --------------------------------------------------------------------------------------------------

_HF_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_")


def env_for(
    cache_dir: str | os.PathLike,
    modules_dir: str | os.PathLike,
    home_dir: str | os.PathLike | None = None,
) -> dict[str, str]:
    """Environment variables for an offline load from the hand-made cache (set BEFORE importing transformers).

    HF_HOME defaults to ``<cache_dir>/../hf_home`` so no user token or config leaks in.
    """
    cache_dir = Path(cache_dir).resolve()
    home = Path(home_dir).resolve() if home_dir is not None else cache_dir.parent / "hf_home"
    return {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache_dir),
        "HUGGINGFACE_HUB_CACHE": str(cache_dir),  # legacy name, same value
        "HF_MODULES_CACHE": str(Path(modules_dir).resolve()),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def clean_environ(extra: dict[str, str] | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) without inherited HF_*/HUGGINGFACE_*/TRANSFORMERS_* variables, plus ``extra``."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(_HF_PREFIXES)}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_python(
    code: str,
    env: dict[str, str] | None = None,
    *,
    cwd: str | os.PathLike | None = None,
    timeout: float = 120,
    python_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run ``sys.executable [python_args] -c code`` in a fresh process with ``clean_environ(env)``; text output."""
    return subprocess.run(
        [sys.executable, *python_args, "-c", code],
        env=clean_environ(env), cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


def start_python(
    code: str,
    env: dict[str, str] | None = None,
    *,
    cwd: str | os.PathLike | None = None,
    python_args: tuple[str, ...] = (),
) -> subprocess.Popen:
    """Like ``run_python`` but returns the running ``Popen`` (stdout/stderr piped, text): start several
    fresh interpreters at once and ``communicate()`` later (each pays ~5-8 s of torch/transformers import)."""
    return subprocess.Popen(
        [sys.executable, *python_args, "-c", code],
        env=clean_environ(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def site_without(dest: str | os.PathLike, hidden: tuple[str, ...] = ("torch", "torchgen", "functorch")) -> Path:
    """A folder of symlinks to every entry of the current site-packages except ``hidden`` packages
    (and their ``*.dist-info``). Run ``python -S`` with ``PYTHONPATH=<dest>`` to get an interpreter that
    has no torch at all (find_spec and importlib.metadata both miss it)."""
    import site

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    hidden_l = {h.lower().replace("-", "_") for h in hidden}
    for sp in site.getsitepackages():
        sp = Path(sp)
        if not sp.is_dir():
            continue
        for entry in sp.iterdir():
            stem = entry.name.split("-", 1)[0].split(".", 1)[0].lower().replace("-", "_")
            if stem in hidden_l or entry.suffix == ".pth":
                continue
            link = dest / entry.name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(entry)
    return dest
