"""Real model code for the import, process, code, file and tamper tests: torch hub folders, pickled
functions, modules whose body is the payload. Every payload leaves a marker file, so a test can
show both sides: present with the guard off, absent when tmtguard blocks it."""
from __future__ import annotations

import marshal
import os
import sys
import textwrap
import uuid

import artifacts as A


def hub_folder(root, forward: str, *, name: str | None = None, net_imports: str = "",
               hubconf_body: str = "", files: dict | None = None) -> str:
    """A torch hub folder: ``hubconf.py`` with an entry point ``tiny`` returning a ``Net`` defined in
    the folder's own module, whose ``forward(x)`` runs ``forward`` (indented code) at inference."""
    module = name or f"net_{uuid.uuid4().hex[:8]}"  # a fresh module name: sys.modules keeps old ones
    folder = os.path.join(str(root), f"hub_{module}")
    os.makedirs(folder)
    with open(os.path.join(folder, "hubconf.py"), "w") as fh:
        fh.write(f"dependencies = ['torch']\n{hubconf_body}\nfrom {module} import Net\n\n\n"
                 "def tiny(**kwargs):\n    return Net()\n")
    body = textwrap.indent(textwrap.dedent(forward).strip() or "pass", " " * 8)
    with open(os.path.join(folder, f"{module}.py"), "w") as fh:
        fh.write(f"import torch\n{net_imports}\n\n\nclass Net(torch.nn.Module):\n"
                 "    def __init__(self):\n        super().__init__()\n        self.lin = torch.nn.Linear(2, 2)\n\n"
                 f"    def forward(self, x):\n{body}\n        return self.lin(x)\n")
    for fname, text in (files or {}).items():
        with open(os.path.join(folder, fname), "w") as fh:
            fh.write(text)
    return folder


def forward_line(folder: str, needle: str) -> tuple[str, int]:
    """(file, line) of the first line of the folder's model module containing ``needle``."""
    for fname in os.listdir(folder):
        if fname.startswith("net_") and fname.endswith(".py"):
            path = os.path.join(folder, fname)
            with open(path) as fh:
                for i, line in enumerate(fh, 1):
                    if needle in line:
                        return path, i
    raise AssertionError(f"{needle!r} not in the model module of {folder}")


def load_hub(folder: str):
    import torch

    return torch.hub.load(folder, "tiny", source="local")


def infer(model):
    import torch

    return model(torch.zeros(1, 2))


PICKLED_SOURCE_FILE = "/srv/models/payload_fn.py"  # what the pickled function claims as its file


def pickled_function(body: str, *, filename: str = PICKLED_SOURCE_FILE) -> bytes:
    """A pickle that rebuilds a function with ``marshal.loads`` + ``types.FunctionType`` (what
    pickled-function formats do), whose body is ``body`` (indented code taking ``arg``)."""
    src = "def payload(arg):\n" + textwrap.indent(textwrap.dedent(body).strip(), "    ") + "\n    return arg\n"
    module_code = compile(src, filename, "exec")
    fn_code = next(c for c in module_code.co_consts if hasattr(c, "co_code"))
    code = A.call(A.glob("marshal", "loads"), marshal.dumps(fn_code))
    return A.dumps(A.call(A.glob("types", "FunctionType"), code, A.Op(b"}")))


PICKLED_FUNCTION_RULES = "version: 1\npickle:\n  allow: ['marshal:loads', 'types:FunctionType']\ncode:\n  allow: [pickle]\n"


def payload_module(folder, marker, *, prefix: str = "payload") -> str:
    """A module (on sys.path) whose body writes the marker. Returns its (fresh) name."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with open(os.path.join(str(folder), f"{name}.py"), "w") as fh:
        fh.write(f"open({str(marker)!r}, 'w').write('pwned')\nVALUE = 1\n")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return name


def of(events, action):
    return [e for e in events if e["action"] == action]
