"""``tmtguard demo``: a benign checkpoint and a transitive malicious one, loaded under the guard.

The malicious one looks like an ordinary checkpoint. Its pickle names only globals the built-in
allowlist permits -- among them ``torch.storage._load_from_bytes``, which is how torch pickles a
storage -- but the bytes it hands to that function are a second, nested checkpoint whose pickle calls
``os.system`` to write a marker file. A scanner of the outer file sees tensors; tmtguard sees the
nested load, names both artifacts, and stops the payload before it runs.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import tempfile


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


class _NestedTorchLoad:
    def __init__(self, inner: bytes):
        self.inner = inner

    def __reduce__(self):
        import torch.storage

        return (torch.storage._load_from_bytes, (self.inner,))


class _NestedPickleLoad:
    def __init__(self, inner: bytes):
        self.inner = inner

    def __reduce__(self):
        import pickle

        return (pickle.loads, (self.inner,))


def build(folder: str) -> dict:
    """Write benign and malicious artifacts into folder; returns their paths and the marker path."""
    import pickle

    marker = os.path.join(folder, "PWNED")
    paths = {"marker": marker}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        benign = {"layer.weight": torch.randn(4, 4), "layer.bias": torch.zeros(4)}
        paths["benign"] = os.path.join(folder, "benign.pt")
        torch.save(benign, paths["benign"])
        inner = io.BytesIO()
        torch.save({"head.weight": torch.randn(2, 2), "config": _Payload(marker)}, inner)
        paths["malicious"] = os.path.join(folder, "model.pt")
        torch.save({"layer.weight": torch.randn(4, 4), "head": _NestedTorchLoad(inner.getvalue())}, paths["malicious"])
        paths["format"] = "torch"
    else:
        paths["benign"] = os.path.join(folder, "benign.pkl")
        with open(paths["benign"], "wb") as fh:
            pickle.dump({"weights": [0.1, 0.2], "name": "benign"}, fh)
        inner = pickle.dumps({"config": _Payload(marker)})
        paths["malicious"] = os.path.join(folder, "model.pkl")
        with open(paths["malicious"], "wb") as fh:
            pickle.dump({"weights": [0.3], "head": _NestedPickleLoad(inner)}, fh)
        paths["format"] = "pickle"
    return paths


def _load(paths: dict, which: str):
    if paths["format"] == "torch":
        import torch

        return torch.load(paths[which], weights_only=False)
    import pickle

    with open(paths[which], "rb") as fh:
        return pickle.load(fh)


def main(keep: bool = False) -> int:
    import tmtguard
    from . import config

    if config.requested_mode() == "off":
        print("tmtguard demo: TMTGUARD_MODE=off is set; unset it to see the guard work.")
        return 2
    folder = tempfile.mkdtemp(prefix="tmtguard-demo-")
    try:
        paths = build(folder)
        allowlists = []
        if paths["format"] == "pickle":
            # Without torch the nested loader is pickle.loads, which no built-in allows: trust the outer
            # artifact (by digest) to name it, as a reviewer might, and watch the nested one get caught.
            from .provenance import file_digest

            allowlist = os.path.join(folder, "trust-outer.yaml")
            with open(allowlist, "w") as fh:
                fh.write(f"version: 1\nartifacts:\n  - match: {{sha256: {file_digest(paths['malicious'])}}}\n"
                         f"    pickle:\n      allow: [_pickle:loads]\n")
            allowlists.append(allowlist)
        # The demo prints the refusal itself; keep the log record off the terminal.
        logging.getLogger("tmtguard").propagate = False
        logging.getLogger("tmtguard").addHandler(logging.NullHandler())
        events = []
        tmtguard.add_sink(events.append)
        tmtguard.activate(mode="enforce", allowlists=allowlists)
        print(f"tmtguard demo ({paths['format']} artifacts in {folder})\n")
        _load(paths, "benign")
        print(f"1. benign checkpoint {os.path.basename(paths['benign'])}: loaded, nothing to report.\n")
        try:
            _load(paths, "malicious")
            print("2. malicious checkpoint: LOADED -- this should not happen")
            status = 1
        except tmtguard.PickleViolation as exc:
            print(f"2. malicious checkpoint {os.path.basename(paths['malicious'])}: refused.\n")
            print("\n".join("   " + line for line in str(exc).splitlines()))
            status = 0
        written = os.path.exists(paths["marker"])
        print(f"\n3. payload marker {paths['marker']}: {'WRITTEN -- the payload ran' if written else 'not written: the payload never ran'}")
        if events:
            chain = " -> ".join(f["artifact"] for f in events[-1]["chain"])
            print(f"   event: action={events[-1]['action']} target={events[-1]['target']} chain: {chain}")
        tmtguard.remove_sink(events.append)
        return 1 if written else status
    finally:
        if keep:
            print(f"(kept {folder})")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
