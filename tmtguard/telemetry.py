"""OpenTelemetry: a span per guarded load (``tmtguard.load``), a span event per decision.

OpenTelemetry is imported on first use, not at start-up. Spans join the application's current
trace and go to its global tracer provider, unless TMTGUARD_OTEL_EXPORTER picks tmtguard's own
provider (console JSON on stderr, or OTLP/HTTP). tmtguard's own exporter runs as internal work, so
its network traffic and files are never checked by tmtguard's guards.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time

_exporter_choice = "global"
_tracer = None
_provider = None
_lock = threading.Lock()
_trace = None  # the opentelemetry.trace module once imported
_context = None


def configure(exporter: str) -> None:
    """Choose where spans go; takes effect for the next span."""
    global _exporter_choice, _tracer, _counter
    with _lock:
        if exporter != _exporter_choice:
            _shutdown_own_provider()
            _shutdown_own_meter_provider()
            _exporter_choice = exporter
            _tracer = None
            _counter = None


def _get_tracer():
    global _tracer, _trace, _context, _provider
    if _tracer is not None:
        return _tracer
    with _lock:
        if _tracer is not None:
            return _tracer
        if _exporter_choice == "none":
            _tracer = False
            return _tracer
        from opentelemetry import context, trace

        _trace, _context = trace, context
        if _exporter_choice == "global":
            _tracer = trace.get_tracer("tmtguard")
        else:
            _provider = _own_provider(_exporter_choice)
            _tracer = _provider.get_tracer("tmtguard")
        return _tracer


def _own_provider(kind: str):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "tmtguard"}))
    if kind == "console":
        exporter = ConsoleSpanExporter(out=sys.stderr)
        provider.add_span_processor(SimpleSpanProcessor(_InternalExporter(exporter)))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Bounded: a receiver that is down or slow never holds the application up at exit.
        exporter = OTLPSpanExporter(timeout=2)
        provider.add_span_processor(
            BatchSpanProcessor(_InternalExporter(exporter), max_queue_size=4096, export_timeout_millis=2000)
        )
    atexit.register(_shutdown_own_provider)
    return provider


def _shutdown_own_provider() -> None:
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        try:
            provider.shutdown()
        except Exception:
            pass


class _InternalExporter:
    """Wraps an exporter so everything it does counts as tmtguard's own work."""

    def __init__(self, inner):
        self._inner = inner

    def export(self, spans):
        from . import provenance

        with provenance.internal():
            return self._inner.export(spans)

    def shutdown(self):
        from . import provenance

        with provenance.internal():
            return self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000):
        flush = getattr(self._inner, "force_flush", None)
        return flush(timeout_millis) if flush else True


_UNKNOWN = object()
_proxy_seen_at = [None]  # provenance.environment_changes when get_tracer_provider() last gave the proxy


def _no_global_provider() -> bool:
    """No global TracerProvider is set. OpenTelemetry's get_tracer_provider() reads os.environ
    (OTEL_PYTHON_TRACER_PROVIDER) on every call until one is set, a few microseconds per load frame:
    while its module global is still unset and the environment has not changed, the last answer
    stands. set_tracer_provider() sets that global (once), which is seen on the next call."""
    changes = _env_changes or _bind_env_changes()
    current = getattr(_trace, "_TRACER_PROVIDER", _UNKNOWN)
    if current is None and _proxy_seen_at[0] == changes[0]:
        return True
    if isinstance(_trace.get_tracer_provider(), _trace.ProxyTracerProvider):
        if current is None:
            _proxy_seen_at[0] = changes[0]
        return True
    return False


_env_changes = None


def _bind_env_changes() -> list:
    global _env_changes
    from . import provenance

    _env_changes = provenance.environment_changes
    return _env_changes


def start_load(frame, parent_chain) -> None:
    tracer = _tracer if _tracer is not None else _get_tracer()
    if not tracer:
        return
    if _exporter_choice == "global" and _no_global_provider():
        return  # no TracerProvider configured (yet): the span would record nothing; checked per load
    try:
        from . import provenance

        with provenance.internal():
            attrs = {"tmtguard.loader": frame.loader, "tmtguard.artifact": frame.artifact,
                     "tmtguard.depth": len(parent_chain) + 1}
            if frame.repo:
                attrs["tmtguard.repo"] = frame.repo
            span = tracer.start_span("tmtguard.load", attributes=attrs)
            token = _context.attach(_trace.set_span_in_context(span))
            frame.span = (span, token)
    except Exception:
        frame.span = None


def end_load(frame, error) -> None:
    held = frame.span
    if held is None:
        return
    frame.span = None
    span, token = held
    try:
        from . import provenance

        with provenance.internal():
            digest = frame._sha256
            if digest:
                span.set_attribute("tmtguard.sha256", digest)
            if error is not None:
                from .decision import Violation

                from opentelemetry.trace import Status, StatusCode

                if isinstance(error, Violation):
                    span.set_status(Status(StatusCode.ERROR, str(error).splitlines()[0]))
                else:
                    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200]))
            _ender.end(span)
            try:
                _context.detach(token)
            except Exception:
                pass
    except Exception:
        pass


# --- ending spans: the load never waits on an exporter for more than END_WAIT seconds ---------------
# span.end() runs the application's span processors, and a SimpleSpanProcessor exports right there:
# an exporter that hangs would hang the guarded load (in enforce, before its refusal is raised) for
# good. So tmtguard's spans end on a helper thread. The load waits for it at most END_WAIT (with a
# working exporter the span is exported before the load returns, as before), and not at all while the
# helper is stuck on an earlier span; spans queued beyond _END_QUEUE_MAX are counted drops.
# Spans that cannot block end right away: a non-recording span (no SDK provider), or one whose
# processors are all BatchSpanProcessors (on_end only enqueues).
END_WAIT = 0.5
_END_QUEUE_MAX = 1024
_never_blocks: dict = {}  # id(the span's processor) -> bool, cached per provider


def _ends_without_blocking(span) -> bool:
    try:
        if not span.is_recording():
            return True
        multi = getattr(span, "_span_processor", None)
        if multi is None:
            return False
        key = id(multi)
        known = _never_blocks.get(key)
        if known is None:
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            procs = getattr(multi, "_span_processors", None)
            known = procs is not None and all(isinstance(p, BatchSpanProcessor) for p in procs)
            _never_blocks[key] = known
        return known
    except Exception:
        return False


class _Ender:
    def __init__(self):
        self.queue = None
        self.pid = None
        self.busy_since = None  # time.monotonic() when the helper started ending its current span
        self.lock = threading.Lock()

    def end(self, span) -> None:
        if _ends_without_blocking(span):
            span.end()
            return
        end_time = time.time_ns()
        if self.pid != os.getpid():  # first span, or a forked child (the helper thread did not fork)
            self._start()
        busy = self.busy_since
        stuck = busy is not None and time.monotonic() - busy > END_WAIT
        done = threading.Event()
        try:
            self.queue.put_nowait((span, end_time, done))
        except Exception as exc:  # queue.Full: the exporter has been stuck for a long while
            from . import events

            events.count_drop("opentelemetry (a span processor is stuck)", exc)
            return
        if not stuck:
            done.wait(END_WAIT)

    def _start(self) -> None:
        import queue

        with self.lock:
            if self.pid == os.getpid():
                return
            self.queue = queue.Queue(_END_QUEUE_MAX)
            self.busy_since = None
            threading.Thread(target=self._run, args=(self.queue,), name="tmtguard-span-end", daemon=True).start()
            self.pid = os.getpid()

    def _run(self, q) -> None:
        from . import provenance

        while True:
            span, end_time, done = q.get()
            self.busy_since = time.monotonic()
            try:
                with provenance.internal():
                    span.end(end_time=end_time)
            except Exception:
                pass
            finally:
                self.busy_since = None
                done.set()


_ender = _Ender()


def decision_event(frame, record: dict) -> None:
    """Attach a decision to the innermost load's span (or the application's current span)."""
    tracer = _tracer if _tracer is not None else _get_tracer()
    if not tracer:
        return
    span = frame.span[0] if frame is not None and frame.span is not None else _trace.get_current_span()
    import json

    attrs = {
        "tmtguard.action": record["action"],
        "tmtguard.decision": record["decision"],
        "tmtguard.target": record["target"],
        "tmtguard.rule": record["rule"],
        "tmtguard.mode": record["mode"],
        "tmtguard.chain": json.dumps(record["chain"]),
        "tmtguard.chain.artifacts": [f["artifact"] for f in record["chain"]],
    }
    if record.get("origin"):
        attrs["tmtguard.origin"] = json.dumps(record["origin"])
    span.add_event("tmtguard.decision", attributes=attrs)
    if record["decision"] == "blocked":
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, f"tmtguard blocked {record['action']} {record['target']}"))


def force_flush() -> None:
    if _provider is not None:
        try:
            _provider.force_flush(2000)
        except Exception:
            pass


# --- metrics: a counter of decisions ------------------------------------------------------------

_counter = None  # None: not made yet; False: metrics off
_meter_provider = None

DECISIONS_METRIC = "tmtguard.decisions"
NO_ARTIFACT = "(none)"


def count_decision(record: dict) -> None:
    """Add one to ``tmtguard.decisions`` by action, decision and outermost artifact."""
    counter = _counter if _counter is not None else _get_counter()
    if not counter:
        return
    chain = record.get("chain") or ()
    counter.add(1, {
        "tmtguard.action": record["action"],
        "tmtguard.decision": record["decision"],
        "tmtguard.artifact": chain[0]["artifact"] if chain else NO_ARTIFACT,
    })


def _get_counter():
    global _counter, _meter_provider
    if _counter is not None:
        return _counter
    with _lock:
        if _counter is not None:
            return _counter
        if _exporter_choice == "none":
            _counter = False
            return _counter
        if _exporter_choice == "global":
            from opentelemetry import metrics

            meter = metrics.get_meter("tmtguard")
        else:
            _meter_provider = _own_meter_provider(_exporter_choice)
            meter = _meter_provider.get_meter("tmtguard")
        _counter = meter.create_counter(
            DECISIONS_METRIC, unit="{decision}",
            description="tmtguard decisions, by action, decision (blocked|audited) and outermost artifact")
        return _counter


def _own_meter_provider(kind: str):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    if kind == "console":
        exporter = ConsoleMetricExporter(out=sys.stderr)
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter(timeout=2)
    # Exported every OTEL_METRIC_EXPORT_INTERVAL and at exit, each export bounded as the spans' are.
    reader = PeriodicExportingMetricReader(_internal_metric_exporter(exporter), export_timeout_millis=2000)
    provider = MeterProvider(resource=Resource.create({"service.name": "tmtguard"}), metric_readers=[reader])
    atexit.register(_shutdown_own_meter_provider)
    return provider


def _internal_metric_exporter(inner):
    """``inner``, with everything it does counted as tmtguard's own work (never checked)."""
    from opentelemetry.sdk.metrics.export import MetricExporter

    from . import provenance

    class InternalMetricExporter(MetricExporter):
        def __init__(self):
            super().__init__(preferred_temporality=inner._preferred_temporality,
                             preferred_aggregation=inner._preferred_aggregation)

        def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs):
            with provenance.internal():
                return inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            with provenance.internal():
                return inner.force_flush(timeout_millis=timeout_millis)

        def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
            with provenance.internal():
                inner.shutdown(timeout_millis=timeout_millis, **kwargs)

    return InternalMetricExporter()


def _shutdown_own_meter_provider() -> None:
    global _meter_provider
    provider, _meter_provider = _meter_provider, None
    if provider is not None:
        try:
            provider.shutdown(timeout_millis=3000)
        except Exception:
            pass
