"""Fuzzing the pickle guard and the allowlist parser with hypothesis.

Pickles: random bytes, and valid pickles of built-in types (every protocol) mutated (bytes flipped,
inserted, deleted, duplicated) with GLOBAL / STACK_GLOBAL / INST of random and dangerous
``module:name`` pairs spliced in, loaded through the C and the pure-Python unpicklers in enforce.
Invariants, checked on every example:

* tmtguard never crashes: the only exceptions are its own refusals (Violation) and the unpickler's
  ordinary errors; never a GuardError (tmtguard failing while deciding), never an exception raised
  from tmtguard's own code, never a dropped event;
* no non-allowlisted global gets through: an independent PEP 578 hook, added after tmtguard's (so
  it sees what tmtguard let pass), records every ``pickle.find_class`` and each must be in the
  effective allowlist;
* nothing hangs: every example runs under a wall-clock alarm.

Allowlists: random text and mutated valid allowlists: ``tmtguard.policy.parse`` raises only
AllowlistError (a clear message naming the file), whatever the input.

And atheris (coverage-guided, libFuzzer) over tmtguard's own decision code, in a fresh interpreter
with a bounded number of runs: the same invariants; skipped where atheris is not installed.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import resource
import signal
import string
import struct
import sys

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tmtguard  # noqa: E402
from tmtguard import activation, events  # noqa: E402
from tmtguard.policy import AllowlistError, parse  # noqa: E402

TMTGUARD_DIR = os.path.dirname(os.path.abspath(tmtguard.__file__)) + os.sep
EXAMPLE_SECONDS = 10  # an example that runs longer than this is a hang
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])

# What an unpickler may raise on garbage, besides tmtguard's refusals.
ORDINARY = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            ImportError, UnicodeError, OverflowError, MemoryError, struct.error, RecursionError,
            NotImplementedError, ZeroDivisionError, LookupError, AssertionError, OSError, StopIteration,
            ArithmeticError, BufferError)


# --- the independent observer -------------------------------------------------------------------
# An audit hook cannot be removed: add one for the whole session, recording only while a flag is set.

class _Observer:
    recording = False
    seen: list = []


_observer = _Observer()
_hooked = False


def _observe(event, args):
    if event == "pickle.find_class" and _observer.recording:
        _observer.seen.append((args[0], args[1]))


@contextlib.contextmanager
def observing():
    global _hooked
    if not _hooked:
        sys.addaudithook(_observe)  # after tmtguard's hook: it sees only what tmtguard let through
        _hooked = True
    _observer.seen = []
    _observer.recording = True
    try:
        yield _observer.seen
    finally:
        _observer.recording = False


# --- guards for the harness itself -------------------------------------------------------------------


class Hang(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: float):
    def fire(signum, frame):
        raise Hang(f"an example ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def memory_ceiling(extra: int = 1 << 30):
    """A mutated pickle may call an allowlisted constructor with a huge size (bytearray(2**31)):
    cap the address space for the duration so that it is a MemoryError, not an OOM kill."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        with open("/proc/self/status") as fh:
            vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        yield
        return
    limit = vm + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# tmtguard's entry-point wrappers: an error whose innermost Python frame is one of these came from
# the C unpickler they called (C frames do not show), not from tmtguard.
WRAPPERS = frozenset({"loads", "load", "_framed", "_py_loads", "_py_load", "call_in_frame"})  # pass-through frames


def _raised_inside_tmtguard(exc: BaseException) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code
        tb = tb.tb_next
    return bool(last and last.co_filename.startswith(TMTGUARD_DIR) and last.co_name not in WRAPPERS)


# --- pickle strategies ---------------------------------------------------------------------------------

ALLOWED_SAMPLE = [("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                  ("datetime", "datetime"), ("decimal", "Decimal"), ("_codecs", "encode"),
                  ("copyreg", "_reconstructor"), ("builtins", "object"), ("builtins", "complex"),
                  ("argparse", "Namespace"), ("uuid", "UUID"), ("fractions", "Fraction")]
DANGEROUS = [("posix", "system"), ("os", "system"), ("builtins", "eval"), ("builtins", "exec"),
             ("builtins", "getattr"), ("builtins", "__import__"), ("subprocess", "Popen"), ("pickle", "loads"),
             ("_pickle", "loads"), ("importlib", "import_module"), ("pkgutil", "resolve_name"),
             ("operator", "attrgetter"), ("_operator", "methodcaller"), ("marshal", "loads"), ("types", "FunctionType"),
             ("pathlib", "os.system"), ("uuid", "os.system"), ("collections", "OrderedDict.fromkeys"),
             ("builtins", "set.__init__"), ("copyreg", "add_extension"), ("runpy", "_run_code"), ("ctypes", "CDLL"),
             ("tmtguard", "deactivate"), ("__builtin__", "eval"), ("commands", "getoutput")]
ident = st.text(string.ascii_letters + "_", min_size=1, max_size=8)
dotted = st.lists(ident, min_size=1, max_size=3).map(".".join)
pairs = st.one_of(st.sampled_from(ALLOWED_SAMPLE), st.sampled_from(DANGEROUS), st.tuples(dotted, dotted),
                  st.tuples(st.text(max_size=12), st.text(max_size=12)))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.text(max_size=20), st.binary(max_size=20), st.complex_numbers(allow_nan=False, max_magnitude=1e6))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4),
                            st.frozensets(st.integers(), max_size=4), st.sets(st.text(max_size=4), max_size=4),
                            inner.map(lambda v: [v, v])),  # the same object twice: memo PUT/GET
    max_leaves=12)


def _encode_str(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return b"\x8c" + bytes([len(b)]) + b if len(b) < 256 else b"X" + struct.pack("<I", len(b)) + b


def _global_op(kind: int, module: str, name: str) -> bytes:
    if kind == 0:  # STACK_GLOBAL
        return _encode_str(module) + _encode_str(name) + b"\x93"
    if kind == 1:  # GLOBAL (text)
        return b"c" + module.encode("utf-8", "surrogatepass") + b"\n" + name.encode("utf-8", "surrogatepass") + b"\n"
    return b"(" + b"i" + module.encode("utf-8", "surrogatepass") + b"\n" + name.encode("utf-8", "surrogatepass") + b"\n"


@st.composite
def mutated_pickles(draw):
    data = bytearray(pickle.dumps(draw(values), protocol=draw(st.integers(0, 5))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 5))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and data:  # flip a byte
            i = min(pos, len(data) - 1)
            data[i] = draw(st.integers(0, 255))
        elif op == 1:  # insert random bytes
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2 and data:  # delete a slice
            del data[pos:pos + draw(st.integers(1, 6))]
        elif op == 3:  # duplicate a slice
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 12))]
        else:  # splice a global (and maybe a call of it)
            module, name = draw(pairs)
            chunk = _global_op(draw(st.integers(0, 2)), module, name)
            if draw(st.booleans()):
                chunk += _encode_str(draw(st.text(max_size=8))) + b"\x85R"  # (arg,) REDUCE
            data[pos:pos] = chunk
    return bytes(data)


random_pickles = st.one_of(
    st.binary(max_size=120),
    st.tuples(st.integers(0, 5), st.binary(max_size=120)).map(lambda t: b"\x80" + bytes([t[0]]) + t[1]),
)

ENTRY_POINTS = {
    "pickle.loads": pickle.loads,
    "pickle._loads": lambda d: pickle._loads(d),
    "pickle.Unpickler": lambda d: pickle.Unpickler(io.BytesIO(d)).load(),
}


def _check_one(data: bytes, entry: str) -> None:
    policy = activation.active.policy
    allowed = set(policy.base.pickle)
    dropped = events.dropped()
    recorded: list = []
    tmtguard.add_sink(recorded.append)
    try:
        with observing() as seen, alarm(EXAMPLE_SECONDS):
            try:
                ENTRY_POINTS[entry](data)
            except tmtguard.GuardError as exc:
                pytest.fail(f"tmtguard failed while deciding ({entry}, {data!r}): {exc}")
            except tmtguard.Violation:
                pass
            except Hang:
                raise
            except ORDINARY as exc:
                if _raised_inside_tmtguard(exc):
                    raise AssertionError(f"{type(exc).__name__} raised from tmtguard's own code ({entry}, {data!r})") from exc
    finally:
        tmtguard.remove_sink(recorded.append)
    leaked = [p for p in seen if p not in allowed]
    assert not leaked, f"non-allowlisted globals resolved through {entry}: {leaked} ({data!r})"
    assert events.dropped() == dropped, "an event was dropped"
    for rec in recorded:
        assert rec["decision"] == "blocked" and rec["target"] and rec["chain"], rec


@pytest.fixture(scope="module")
def enforce():
    tmtguard.activate(mode="enforce", allowlists=[])
    yield
    tmtguard.activate(mode="enforce", allowlists=[])


@FUZZ
@given(data=mutated_pickles(), entry=st.sampled_from(sorted(ENTRY_POINTS)))
def test_mutated_pickles_never_crash_never_leak(enforce, data, entry):
    with memory_ceiling():
        _check_one(data, entry)


@FUZZ
@given(data=random_pickles, entry=st.sampled_from(sorted(ENTRY_POINTS)))
def test_random_pickles_never_crash_never_leak(enforce, data, entry):
    with memory_ceiling():
        _check_one(data, entry)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(pair=pairs, kind=st.integers(0, 2))
def test_any_spliced_global_is_allowed_only_if_allowlisted(enforce, pair, kind):
    """The exact decision for one global, whatever its spelling: allowed iff the exact pair is listed."""
    module, name = pair
    data = b"\x80\x04" + _global_op(kind, module, name) + b"."
    allowed = pair in set(activation.active.policy.base.pickle)
    with observing() as seen:
        try:
            pickle.loads(data)
        except tmtguard.PickleViolation as exc:
            assert not allowed and repr(f"{module}:{name}") in str(exc).splitlines()[0]
        except ORDINARY:
            pass
    assert all(p == pair for p in seen) and (bool(seen) <= allowed)


# --- allowlist files ------------------------------------------------------------------------------

VALID_ALLOWLIST = """\
version: 1
pickle:
  allow:
    - collections:OrderedDict
    - myapp.models:Net
imports:
  allow: [tokenizers, "mylib.*"]
network:
  process_wide: false
  allow: ["127.0.0.1:8080", "*.internal.example:443", "10.0.0.0/8:*", "[::1]:9000", "unix:/run/x.sock"]
process:
  allow: [git, /usr/bin/true]
files:
  allow: ["/data/*", ~/models]
code:
  allow: ["torch.fx.*"]
native:
  allow: ["libfoo.so:bar", "<process>"]
remote_code:
  allow:
    - repo: org/name
      revision: 0123456789abcdef0123456789abcdef01234567
      files:
        modeling_x.py: sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
artifacts:
  - match: {sha256: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef}
    pickle:
      allow: [builtins:len]
  - match: {path: "/models/*.pt", repo: org/name}
    network:
      allow: ["hub.example:443"]
"""

YAML_BITS = ["\n", " ", "  ", "- ", ": ", "{", "}", "[", "]", ",", "'", '"', "!!python/object:os.system", "&a ", "*a",
             "<<: *a", "? ", "|", ">", "#", "%YAML 1.1\n", "---\n", "...\n", "\t", "version", "pickle", "allow",
             "artifacts", "match", "sha256", "files", "remote_code", "repo", "revision", "network", "process_wide",
             "true", "null", "1", "1.0", "0x1", "~", ":", "::", "\x00", "\ufeff", "é", "\x85", "&a [*a]", "? [a]\n: b\n",
             "[x]: ", "&b {k: *b}"]

# Found by this fuzzer (both fixed in tmtguard/policy/schema.py): a recursive alias made the tag check
# loop forever (and shared aliases made it exponential); a non-string file name under
# remote_code.allow[].files raised TypeError.
RECURSIVE_ALIAS = "version: 1\npickle: &a {allow: [*a]}\n"
ALIAS_BOMB = "version: 1\nx: &a [y, y]\n" + "".join(f"x{i}: &a{i} [{', '.join(['*a' if i == 0 else f'*a{i - 1}'] * 9)}]\n"
                                                     for i in range(12))
FILES_KEY_LIST = ("version: 1\nremote_code:\n  allow:\n    - repo: a/b\n      revision: " + "0" * 40
                  + "\n      files:\n        [a]: sha256:" + "0" * 64 + "\n")


@st.composite
def mutated_allowlists(draw):
    lines = VALID_ALLOWLIST.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.integers(0, 4))
        i = draw(st.integers(0, len(lines)))
        if op == 0 and lines:
            del lines[min(i, len(lines) - 1)]
        elif op == 1 and lines:
            lines.insert(i, lines[draw(st.integers(0, len(lines) - 1))])  # a duplicated line (duplicate keys)
        elif op == 2 and lines:
            j = min(i, len(lines) - 1)
            line = lines[j]
            k = draw(st.integers(0, len(line)))
            lines[j] = line[:k] + draw(st.sampled_from(YAML_BITS)) + line[k:]
        elif op == 3 and lines:
            j = min(i, len(lines) - 1)
            line = lines[j]
            k = draw(st.integers(0, len(line)))
            lines[j] = line[:k] + line[k + draw(st.integers(1, 8)):]
        else:
            lines.insert(i, draw(st.text(alphabet="".join(YAML_BITS), max_size=30)) + "\n")
    return "".join(lines)


def _parse_only_allowlist_errors(text: str) -> None:
    with alarm(EXAMPLE_SECONDS):
        try:
            parse(text, "fuzz.yaml")
        except AllowlistError as exc:
            assert str(exc).startswith("fuzz.yaml"), f"the error names the file: {exc}"


@FUZZ
@given(text=mutated_allowlists())
@example(text=RECURSIVE_ALIAS)
@example(text=ALIAS_BOMB)
@example(text=FILES_KEY_LIST)
def test_mutated_allowlists_raise_only_allowlist_errors(text):
    _parse_only_allowlist_errors(text)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.text(alphabet="".join(YAML_BITS), max_size=200)))
def test_random_allowlists_raise_only_allowlist_errors(text):
    _parse_only_allowlist_errors(text)


def test_the_observer_sees_what_a_guard_lets_through(unguarded):
    # The leak check is only as good as its observer: with the guard off, a forbidden global shows.
    with observing() as seen:
        assert pickle.loads(b"\x80\x04\x8c\x08builtins\x8c\x03len\x93\x8c\x02ab\x85R.") == 2
    assert seen == [("builtins", "len")]


def test_the_valid_allowlist_used_for_mutations_parses():
    af = parse(VALID_ALLOWLIST, "valid.yaml")
    assert ("myapp.models", "Net") in af.base.pickle and len(af.scoped) == 2


# --- atheris: coverage-guided, over tmtguard's own decision code --------------------------------------
# libFuzzer takes over the process it runs in, so the harness runs in a fresh interpreter with a seed
# corpus of valid pickles, a bounded number of runs and a time cap. tmtguard is instrumented so that
# inputs reaching new decision paths (new global spellings, nested loads) are kept and mutated.

ATHERIS_HARNESS = r"""
import io, os, pickle, resource, sys
import atheris

# A few bytes can ask for gigabytes (BYTEARRAY8's length, bytearray(n) through the allowlisted
# builtins:bytearray): tmtguard decides globals, not sizes. Cap the address space so that is a
# MemoryError here, not the fuzzer's out-of-memory stop.
with open("/proc/self/status") as fh:
    vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))

with atheris.instrument_imports(include=["tmtguard"]):
    import tmtguard
    from tmtguard import activation, events
tmtguard.activate(mode="enforce", allowlists=[])
ALLOWED = set(activation.active.policy.base.pickle)
seen = []
recording = [False]


def observe(event, args):
    if event == "pickle.find_class" and recording[0]:
        seen.append((args[0], args[1]))


sys.addaudithook(observe)
ORDINARY = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            ImportError, UnicodeError, OverflowError, MemoryError, RecursionError, LookupError, ArithmeticError,
            NotImplementedError, OSError, StopIteration, BufferError, AssertionError)
import struct
ORDINARY = ORDINARY + (struct.error,)
DROPPED = events.dropped()


def one(data):
    del seen[:]
    recording[0] = True
    try:
        (pickle.loads if len(data) % 2 else lambda d: pickle.Unpickler(io.BytesIO(d)).load())(data)
    except tmtguard.GuardError:
        raise
    except tmtguard.Violation:
        pass
    except ORDINARY:
        pass
    finally:
        recording[0] = False
    leaked = [p for p in seen if p not in ALLOWED]
    if leaked:
        raise RuntimeError(f"non-allowlisted globals resolved: {leaked}")
    if events.dropped() != DROPPED:
        raise RuntimeError("an event was dropped")


atheris.Setup(sys.argv, one)
atheris.Fuzz()
"""


def test_atheris_coverage_guided_pickles(tmp_path):
    pytest.importorskip("atheris")
    import subprocess

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = [pickle.dumps(v, protocol=p) for p, v in enumerate(
        [{"a": [1, 2.5, "x"]}, (b"\x00", None, True), {1: frozenset({2})}, [complex(1, 2)] * 2, {"s": {"t"}}, b"y" * 40])]
    seeds += [b"\x80\x04" + _global_op(k, m, n) + b"." for k, (m, n) in enumerate(DANGEROUS[:6] + ALLOWED_SAMPLE[:3])]
    for i, seed in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(seed)
    harness = tmp_path / "harness.py"
    harness.write_text(ATHERIS_HARNESS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMTGUARD_")}
    out = subprocess.run([sys.executable, str(harness), "-runs=50000", "-max_total_time=15", "-rss_limit_mb=4096",
                          "-max_len=256", f"-artifact_prefix={tmp_path}/", str(corpus)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "Done" in log and "Uncaught Python exception" not in log
