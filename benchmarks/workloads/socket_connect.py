"""2,000 TCP connects to a loopback server, from application code.

The server is a thread in the same process listening on 127.0.0.1 (ephemeral port) that accepts
and closes. The client closes with SO_LINGER(0) so no TIME_WAIT sockets pile up across rounds
(2,000 x reps x rounds connects would otherwise exhaust ephemeral ports). Only 127.0.0.1 is ever
contacted.
"""

from __future__ import annotations

from pathlib import Path

NAME = "socket_connect"
N_CONNECTS = 2000
TITLE = f"socket connect x {N_CONNECTS:,} to 127.0.0.1 (in-process server)"
BUDGET = 1.05
PEERS = ()
REPS = 9
QUICK_REPS = 3
KIND = "inprocess"


def prepare(cache_dir: Path) -> dict:
    return {"n": N_CONNECTS}


def _start_server():
    import socket
    import threading

    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(512)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.close()

    t = threading.Thread(target=serve, name="bench-loopback-server", daemon=True)
    t.start()
    return srv, srv.getsockname()


def setup(params: dict, config: str):
    import socket
    import struct

    n = params["n"]
    _srv, addr = _start_server()
    linger = struct.pack("ii", 1, 0)

    def run():
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            s.connect(addr)
            s.close()

    return run
