"""The originals, captured before tmtguard patches anything, so that tmtguard's own I/O (events,
hashing, allowlists, telemetry) never runs through its own guards, and so that uninstall() can
restore exactly what was there."""
from __future__ import annotations

import builtins
import io
import os
import pickle
import _pickle

open = builtins.open  # noqa: A001
io_open = io.open
os_open = os.open
os_write = os.write
os_close = os.close
os_read = os.read
os_fstat = os.fstat

pickle_load = pickle.load
pickle_loads = pickle.loads
pickle_Unpickler = pickle.Unpickler
pickle_py_load = pickle._load
pickle_py_loads = pickle._loads
pickle_py_Unpickler = pickle._Unpickler
c_load = _pickle.load
c_loads = _pickle.loads
c_Unpickler = _pickle.Unpickler

try:  # tmtguard's own directory listings without os.listdir's audit event (a call into the file guard
    # inside a load, which stands aside for tmtguard's own work anyway): listdir(path[, prefix])
    from ._auditfast import listdir
except ImportError:
    def listdir(path, prefix=None):
        names = os.listdir(path)
        return names if prefix is None else [n for n in names if n.startswith(prefix)]
