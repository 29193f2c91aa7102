"""Real malicious and benign artifacts for the tests.

Every payload writes a marker file, so a test can prove both sides: with the guard off the marker
appears (the artifact really is malicious), with it on the marker stays absent.
"""
from __future__ import annotations

import io
import os
import pickle
import struct


# --- a tiny pickle assembler: protocol 4 opcodes, so tests can name any (module, qualname) ---------


def _str(s: str) -> bytes:
    b = s.encode()
    return (b"\x8c" + bytes([len(b)]) + b) if len(b) < 256 else (b"X" + struct.pack("<I", len(b)) + b)


def _bytes(b: bytes) -> bytes:
    return (b"C" + bytes([len(b)]) + b) if len(b) < 256 else (b"B" + struct.pack("<I", len(b)) + b)


class Op:
    """A pickle fragment that pushes one value."""

    def __init__(self, code: bytes):
        self.code = code


def val(x) -> Op:
    if isinstance(x, Op):
        return x
    if isinstance(x, str):
        return Op(_str(x))
    if isinstance(x, bytes):
        return Op(_bytes(x))
    if x is None:
        return Op(b"N")
    if isinstance(x, bool):
        return Op(b"\x88" if x else b"\x89")
    if isinstance(x, int):
        return Op(b"J" + struct.pack("<i", x))
    if isinstance(x, (tuple, list)):
        return Op(b"(" + b"".join(val(i).code for i in x) + b"t")
    raise TypeError(x)


def glob(module: str, name: str) -> Op:
    """STACK_GLOBAL: the name may be dotted (``pathlib``, ``os.system``)."""
    return Op(_str(module) + _str(name) + b"\x93")


def call(fn: Op, *args) -> Op:
    """REDUCE: fn(*args)."""
    return Op(fn.code + val(tuple(args)).code + b"R")


def dumps(op: Op) -> bytes:
    return b"\x80\x04" + op.code + b"."


def write_marker_call(marker: str) -> Op:
    """os.system('echo pwned > marker'): the classic payload, through posix:system."""
    return call(glob("posix", "system"), f"echo pwned > {marker}")


def exec_marker_call(marker: str) -> Op:
    """builtins.exec of Python that writes the marker (no shell)."""
    return call(glob("builtins", "exec"), f"open({marker!r}, 'w').write('pwned')")


def marker_pickle(marker: str, *, via: str = "system") -> bytes:
    payload = write_marker_call(marker) if via == "system" else exec_marker_call(marker)
    return dumps(val_dict({"weights": [1, 2, 3], "config": payload}))


def val_dict(d: dict) -> Op:
    code = b"}("
    for k, v in d.items():
        code += val(k).code + val(v).code
    return Op(code + b"u")


# --- classes whose __reduce__ builds payloads inside real torch / numpy / joblib files ---------------


class Reduce:
    """Pickles as fn(*args): lets torch.save / joblib.dump / numpy.save embed a payload."""

    def __init__(self, fn, *args):
        self.fn = fn
        self.args = args

    def __reduce__(self):
        return (self.fn, self.args)


def system_payload(marker: str) -> Reduce:
    return Reduce(os.system, f"echo pwned > {marker}")


def torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def nested_from_bytes(inner: bytes) -> Reduce:
    """torch.storage._load_from_bytes(inner): how torch pickles a storage; a nested torch.load."""
    import torch.storage

    return Reduce(torch.storage._load_from_bytes, inner)


def nested_torch_load(path: str) -> Reduce:
    """torch.load(path, None, pickle): passing pickle_module makes torch unpickle fully (no weights_only).
    Save the result with :func:`torch_save` so that the pickle module is written as a global."""
    import torch

    return Reduce(torch.load, path, None, pickle)


class _RefPickler(pickle._Pickler):
    """Writes the pickle module as the global torch.serialization:pickle (modules cannot be pickled)."""

    def save(self, obj, save_persistent_id=True):
        if obj is pickle:
            self.write(b"ctorch.serialization\npickle\n")
            return
        return super().save(obj, save_persistent_id)


def torch_save(obj, path) -> None:
    """torch.save into a real zip checkpoint, allowing nested_torch_load() references inside."""
    import types

    import torch

    module = types.ModuleType("tmtguard_tests_pickle")
    module.Pickler = _RefPickler
    torch.save(obj, path, pickle_module=module)


def nested_pickle_loads(inner: bytes) -> Reduce:
    return Reduce(pickle.loads, inner)
