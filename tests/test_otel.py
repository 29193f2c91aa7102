"""Telemetry to a real receiver: an OTLP/HTTP endpoint on loopback that decodes the real protobuf
payloads, fed by an application in a fresh interpreter; and the application unaffected when the
receiver is down or hangs."""
from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import artifacts as A
from conftest import subprocess_env

pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402

# Loads a pickle whose own pickle calls pickle.loads on a second, inner one: two nested guarded loads.
APP = """
import pickle, sys, time
try:
    pickle.load(open(sys.argv[1], "rb"))
    print("loaded")
except pickle.UnpicklingError as exc:
    print("refused", type(exc).__name__)
print("done at", repr(time.time()), flush=True)
"""


class Receiver:
    """OTLP/HTTP on 127.0.0.1: /v1/traces and /v1/metrics, decoded with opentelemetry-proto."""

    def __init__(self, *, hang: float = 0.0):
        self.traces: list = []
        self.metrics: list = []
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests += 1
                if hang:
                    time.sleep(hang)  # accept, read, never answer in time
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    receiver.traces.append(ExportTraceServiceRequest.FromString(body))
                elif self.path == "/v1/metrics":
                    receiver.metrics.append(ExportMetricsServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list:
        return [(rs.resource, s) for req in self.traces for rs in req.resource_spans
                for ss in rs.scope_spans for s in ss.spans]

    def data_points(self, name: str) -> list:
        return [dp for req in self.metrics for rm in req.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics if m.name == name for dp in m.sum.data_points]


def attrs(kvs) -> dict:
    out = {}
    for kv in kvs:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = [x.string_value for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)
    return out


@pytest.fixture
def nested_pickle(tmp_path, marker):
    """outer.pkl -> pickle.loads(inner) -> posix:system; an allowlist trusts the outer one to nest."""
    inner = A.marker_pickle(str(marker))
    outer = tmp_path / "outer.pkl"
    outer.write_bytes(A.dumps(A.val_dict({"weights": [1, 2], "head": A.call(A.glob("_pickle", "loads"), inner)})))
    import hashlib

    allowlist = tmp_path / "trust-outer.yaml"
    allowlist.write_text(f"version: 1\nartifacts:\n  - match: {{sha256: {hashlib.sha256(outer.read_bytes()).hexdigest()}}}\n"
                         f"    pickle:\n      allow: ['_pickle:loads']\n")
    app = tmp_path / "app.py"
    app.write_text(APP)
    return outer, allowlist, app


def run_app(nested, cwd, *run_args, **env):
    outer, allowlist, app = nested
    cmd = [sys.executable, "-m", "tmtguard", "run", "--allowlist", str(allowlist), *run_args, "--",
           sys.executable, str(app), str(outer)]
    out = subprocess.run(cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True, timeout=120)
    exited = time.time()
    lines = out.stdout.splitlines()
    done = float(lines[-1].split()[-1]) if lines and lines[-1].startswith("done at") else None
    return out, lines[:-1], (exited - done if done else None)


def test_spans_span_events_and_the_decision_counter_reach_an_otlp_receiver(tmp_path, nested_pickle, marker):
    receiver = Receiver()
    try:
        out, printed, _ = run_app(nested_pickle, tmp_path, TMTGUARD_OTEL_EXPORTER="otlp",
                                  OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
    finally:
        receiver.close()
    assert out.returncode == 0 and printed == ["refused PickleViolation"], out.stderr[-2000:]
    assert not marker.exists()
    loads = [(r, s) for r, s in receiver.spans() if s.name == "tmtguard.load"]
    assert len(loads) == 2, receiver.spans()
    (resource, outer), (_, inner) = sorted(loads, key=lambda rs: attrs(rs[1].attributes)["tmtguard.depth"])
    assert attrs(resource.attributes)["service.name"] == "tmtguard"
    assert attrs(outer.attributes)["tmtguard.artifact"] == str(nested_pickle[0])
    assert attrs(outer.attributes)["tmtguard.loader"] == "pickle.load"
    assert inner.parent_span_id == outer.span_id and inner.trace_id == outer.trace_id
    assert attrs(inner.attributes)["tmtguard.loader"] == "pickle.loads"
    assert inner.status.code == 2 and outer.status.code == 2  # ERROR: the load was blocked
    [decision] = [e for e in inner.events if e.name == "tmtguard.decision"]
    a = attrs(decision.attributes)
    assert (a["tmtguard.action"], a["tmtguard.target"], a["tmtguard.decision"]) == ("pickle.global", "posix:system", "blocked")
    chain = json.loads(a["tmtguard.chain"])
    assert [f["loader"] for f in chain] == ["pickle.load", "pickle.loads"]
    assert chain[0]["artifact"] == str(nested_pickle[0]) and all(len(f["sha256"]) == 64 for f in chain)
    assert a["tmtguard.chain.artifacts"][0] == str(nested_pickle[0])
    [point] = [dp for dp in receiver.data_points("tmtguard.decisions")
               if attrs(dp.attributes)["tmtguard.action"] == "pickle.global"]
    assert point.as_int == 1
    assert attrs(point.attributes) == {"tmtguard.action": "pickle.global", "tmtguard.decision": "blocked",
                                       "tmtguard.artifact": str(nested_pickle[0])}


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("receiver_state", ["down", "hanging"])
def test_the_application_is_unaffected_when_the_receiver_is_down_or_hangs(tmp_path, nested_pickle, marker, receiver_state):
    receiver = Receiver(hang=30) if receiver_state == "hanging" else None
    endpoint = receiver.endpoint if receiver else f"http://127.0.0.1:{_closed_port()}"
    try:
        out, printed, exit_delay = run_app(nested_pickle, tmp_path, "--otel-exporter", "otlp",
                                           OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)
    finally:
        if receiver:
            receiver.server.server_close()  # the hanging handlers are daemon threads
    assert out.returncode == 0 and printed == ["refused PickleViolation"], out.stderr[-2000:]
    assert not marker.exists()
    # Bounded export: spans and metrics each give up after ~2 s at exit instead of hanging on.
    assert exit_delay is not None and exit_delay < 10, exit_delay
    if receiver:
        assert receiver.requests >= 1


def test_console_exporter_writes_json_spans_to_stderr(tmp_path, nested_pickle):
    out, printed, _ = run_app(nested_pickle, tmp_path, "--otel-exporter", "console")
    assert out.returncode == 0 and printed == ["refused PickleViolation"]
    decoder, text, pos, objects = json.JSONDecoder(), out.stderr, 0, []
    while (start := text.find("{", pos)) >= 0:
        try:
            obj, pos = decoder.raw_decode(text, start)
            objects.append(obj)
        except ValueError:
            pos = start + 1
    spans = [o for o in objects if o.get("name") == "tmtguard.load"]
    assert len(spans) == 2
    inner = next(s for s in spans if s["parent_id"] is not None and s["attributes"]["tmtguard.loader"] == "pickle.loads")
    [event] = [e for e in inner["events"] if e["name"] == "tmtguard.decision"]
    assert event["attributes"]["tmtguard.target"] == "posix:system"
    assert "tmtguard.decisions" in out.stderr  # the counter, printed at exit
