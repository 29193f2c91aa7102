"""OpenTelemetry: a span per guarded load, nested loads as child spans, decisions as span events."""
from __future__ import annotations

import json

import pytest

import artifacts as A
import tmtguard
from conftest import run_python, subprocess_env

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def spans():
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # The application's global provider; tmtguard's spans must go there and join its trace.
    trace.set_tracer_provider(provider)
    yield exporter


def test_nested_load_spans_join_the_application_trace(guard, spans, tmp_path, marker):
    from opentelemetry import trace
    from opentelemetry.trace import StatusCode

    inner = A.torch_bytes({"w": torch.ones(2), "cfg": A.system_payload(str(marker))})
    path = tmp_path / "outer.pt"
    torch.save({"w": torch.zeros(2), "nested": A.nested_from_bytes(inner)}, path)
    guard()
    spans.clear()
    tracer = trace.get_tracer("app")
    with tracer.start_as_current_span("handle-request") as request:
        with pytest.raises(tmtguard.PickleViolation):
            torch.load(path, weights_only=False)
    finished = {s.name + ":" + str(s.attributes.get("tmtguard.artifact", "")): s for s in spans.get_finished_spans()}
    outer = finished[f"tmtguard.load:{path}"]
    [inner_span] = [s for k, s in finished.items() if k.startswith("tmtguard.load:<bytes:")]
    assert outer.parent.span_id == request.get_span_context().span_id
    assert inner_span.parent.span_id == outer.context.span_id
    assert outer.context.trace_id == request.get_span_context().trace_id
    assert outer.attributes["tmtguard.loader"] == "torch.load"
    assert inner_span.status.status_code == StatusCode.ERROR and outer.status.status_code == StatusCode.ERROR
    [event] = [e for e in inner_span.events if e.name == "tmtguard.decision"]
    assert event.attributes["tmtguard.target"] == "posix:system"
    assert event.attributes["tmtguard.decision"] == "blocked"
    chain = json.loads(event.attributes["tmtguard.chain"])
    assert [f["artifact"] for f in chain][0] == str(path) and len(chain) == 2


def test_benign_load_span_is_ok(guard, spans, tmp_path):
    from opentelemetry.trace import StatusCode

    path = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, path)
    guard()
    spans.clear()
    torch.load(path, weights_only=False)
    [span] = [s for s in spans.get_finished_spans() if s.name == "tmtguard.load"]
    assert span.status.status_code != StatusCode.ERROR and not span.events


def test_console_exporter_writes_json_spans_to_stderr(tmp_path, marker):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(A.marker_pickle(str(marker)))
    code = f"import pickle\ntry:\n    pickle.load(open({str(evil)!r}, 'rb'))\nexcept Exception as e:\n    print(type(e).__name__)\n"
    out = run_python(code, cwd=tmp_path, env=subprocess_env(TMTGUARD_MODE="enforce", TMTGUARD_OTEL_EXPORTER="console"))
    assert out.stdout.strip() == "PickleViolation", out.stderr
    assert '"name": "tmtguard.load"' in out.stderr and '"tmtguard.decision"' in out.stderr
    assert not marker.exists()


def test_provider_set_after_loads_without_one(tmp_path):
    # Until the application sets a global TracerProvider, tmtguard skips spans without asking
    # OpenTelemetry per load frame; the first load after set_tracer_provider() gets its span.
    ok = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, ok)
    code = f"""
import torch, tmtguard
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
for _ in range(3):
    torch.load({str(ok)!r}, weights_only=False)
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
torch.load({str(ok)!r}, weights_only=False)
print([s.attributes.get("tmtguard.loader") for s in exporter.get_finished_spans() if s.name == "tmtguard.load"])
"""
    out = run_python(code, cwd=tmp_path, env=subprocess_env(TMTGUARD_MODE="enforce"))
    assert out.stdout.strip() == "['torch.load']", out.stderr
