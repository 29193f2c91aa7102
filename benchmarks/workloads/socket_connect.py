"""2,000 TCP connects to a loopback server, from application code.

The server is a separate, unguarded Python process (``python -I -S``: no site, so no tmtguard
start-up hook, and no TMTGUARD_* variables) listening on 127.0.0.1 (ephemeral port) that accepts and
closes; the measured process only connects. It used to be a thread in the measured process, and
then the measurement depended on the GIL: the client releases the GIL around every socket call and
the server thread takes it for each accept, so how many futex waits and wakes a round costs depends
on how the two threads' timings line up (strace counted 42,095 futex calls for 6,000 connects in an
unguarded process and 32,426 in a guarded one), and the CPU time of a round moved by +-10 %
whatever the configuration. In its own process the server costs the measured process nothing.

The client closes with SO_LINGER(0) so no TIME_WAIT sockets pile up across rounds (2,000 x reps x
rounds connects would otherwise exhaust ephemeral ports). Only 127.0.0.1 is ever contacted. The
server exits when the measured process does (end of file on its stdin).
"""

from __future__ import annotations

from pathlib import Path

NAME = "socket_connect"
N_CONNECTS = 2000
TITLE = f"socket connect x {N_CONNECTS:,} to 127.0.0.1 (server in another process)"
BUDGET = 1.05
PEERS = ()
REPS = 9
QUICK_REPS = 3
KIND = "inprocess"


def prepare(cache_dir: Path) -> dict:
    return {"n": N_CONNECTS}


_SERVER = """
import os, socket, sys, threading
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(512)
def serve():
    while True:
        conn, _ = srv.accept()
        conn.close()
threading.Thread(target=serve, daemon=True).start()
print(srv.getsockname()[1], flush=True)
sys.stdin.read()
os._exit(0)
"""


def _start_server():
    """The server process and its (host, port). It has no TMTGUARD_* variables and no site (so no
    start-up hook): it is the same process in every configuration."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TMTGUARD_")}
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _SERVER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)
    line = proc.stdout.readline()
    if not line.strip():
        raise RuntimeError(f"the loopback server did not start (exit status {proc.poll()})")
    return proc, ("127.0.0.1", int(line))


def setup(params: dict, config: str):
    import socket
    import struct

    n = params["n"]
    _server, addr = _start_server()  # kept alive by the closure below
    linger = struct.pack("ii", 1, 0)

    def run():
        _server  # noqa: B018 (the server process lives as long as run)
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            s.connect(addr)
            s.close()

    return run
