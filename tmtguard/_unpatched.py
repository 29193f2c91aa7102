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
