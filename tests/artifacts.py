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


# --- every other way a pickle reaches a callable (the red-team suite, tests/redteam/) ----------------


def raw(code: bytes) -> Op:
    """Opcodes written by hand."""
    return Op(code)


def lst(*items) -> Op:
    """A real list (EMPTY_LIST + APPENDS): for callees that concatenate or mutate their argument."""
    body = b"".join(val(i).code for i in items)
    return Op(b"]" + (b"(" + body + b"e" if items else b""))


def memoize(op: Op, index: int) -> Op:
    """LONG_BINPUT: the value stays on the stack and is stored in memo[index]."""
    return Op(op.code + b"r" + struct.pack("<I", index))


def memo_get(index: int) -> Op:
    """LONG_BINGET: push memo[index] again (a callable named once, used many times)."""
    return Op(b"j" + struct.pack("<I", index))


def build(obj: Op, state) -> Op:
    """BUILD: obj.__setstate__(state), or obj.__dict__.update(state) / setattr for (dict, slotstate)."""
    return Op(obj.code + val(state).code + b"b")


def newobj(cls: Op, *args) -> Op:
    """NEWOBJ: cls.__new__(cls, *args)."""
    return Op(cls.code + val(tuple(args)).code + b"\x81")


def newobj_ex(cls: Op, args: tuple, kwargs: dict) -> Op:
    """NEWOBJ_EX: cls.__new__(cls, *args, **kwargs)."""
    return Op(cls.code + val(tuple(args)).code + val_dict(kwargs).code + b"\x92")


def global_op(module: str, name: str) -> Op:
    """GLOBAL (the text opcode of protocols 0-3): ``c<module>\\n<name>\\n``."""
    return Op(b"c" + module.encode() + b"\n" + name.encode() + b"\n")


def inst(module: str, name: str, *args) -> Op:
    """INST (protocol 0): MARK args... ``i<module>\\n<name>\\n`` calls module.name(*args)."""
    return Op(b"(" + b"".join(val(a).code for a in args) + b"i" + module.encode() + b"\n" + name.encode() + b"\n")


def obj(cls: Op, *args) -> Op:
    """OBJ (protocol 1): MARK cls args... ``o`` calls cls(*args) (any callable, not only a class)."""
    return Op(b"(" + cls.code + b"".join(val(a).code for a in args) + b"o")


def ext(code: int) -> Op:
    """EXT1 / EXT2 / EXT4: the global registered as ``code`` in copyreg's extension registry."""
    if code < 0x100:
        return Op(b"\x82" + bytes([code]))
    if code < 0x10000:
        return Op(b"\x83" + struct.pack("<H", code))
    return Op(b"\x84" + struct.pack("<i", code))


def persid(pid) -> Op:
    """BINPERSID: the unpickler's persistent_load(pid)."""
    return Op(val(pid).code + b"Q")


def dumps_protocol(op: Op, protocol: int) -> bytes:
    """Like :func:`dumps`, with another PROTO header (protocol 2 turns on the Python 2 name mapping)."""
    return b"\x80" + bytes([protocol]) + op.code + b"."


def py_marker(marker: str) -> str:
    """Python source that writes the marker (for payloads that exec, eval or compile)."""
    return f"open({str(marker)!r}, 'w').write('pwned')"


def sh_marker(marker: str) -> str:
    """A shell command that writes the marker."""
    return f"echo pwned > {marker}"
