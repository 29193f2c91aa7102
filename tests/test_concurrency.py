"""Many loads at once: 32 threads and an event loop of asyncio tasks load good and bad artifacts
together, through every loader, for a bounded time.

Every bad load is refused and attributed to its own artifact (the refusal's decision, raised in the
thread or task that loaded it, names that artifact and only it); every good load returns its value;
one event per bad load, none naming a good artifact; nothing deadlocks (every worker is joined with
a timeout; on a hang the stacks are dumped).
"""
from __future__ import annotations

import asyncio
import faulthandler
import hashlib
import pickle
import sys
import threading
import time

import pytest

import artifacts as A
import tmtguard

THREADS = 32
TASKS = 16
SECONDS = 3.0
JOIN_TIMEOUT = 120


class Artifact:
    def __init__(self, name, path, load, expect=None, bad=False, loaders=()):
        self.name, self.path, self.load, self.expect, self.bad, self.loaders = name, path, load, expect, bad, loaders

    @property
    def label(self) -> str:
        return str(self.path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import joblib
    import numpy as np
    import torch

    d = tmp_path_factory.mktemp("corpus")
    markers = d / "markers"
    markers.mkdir()
    out = []

    def pickle_file(name, data):
        p = d / name
        p.write_bytes(data)
        return p

    def with_open(path, fn):
        def load():
            with open(path, "rb") as fh:
                return fn(fh)
        return load

    for i in range(4):
        good = {"layer": i, "w": [0.5 * i] * 8, "meta": {"name": f"good{i}"}}
        p = pickle_file(f"good{i}.pkl", pickle.dumps(good, protocol=i + 2))
        out.append(Artifact(f"good{i}", p, with_open(p, pickle.load), expect=good))
        p = pickle_file(f"bad{i}.pkl", A.marker_pickle(str(markers / f"bad{i}")))
        loader = (pickle.load, lambda fh: pickle.Unpickler(fh).load())[i % 2]
        out.append(Artifact(f"bad{i}", p, with_open(p, loader), bad=True,
                            loaders=(("pickle.load",), ("pickle.Unpickler",))[i % 2]))

    # in-memory artifacts: named by their size and digest
    for i in range(2):
        data = A.marker_pickle(str(markers / f"bytes{i}") + "x" * i)
        out.append(Artifact(f"bytes{i}", f"<bytes:{len(data)}>", lambda data=data: pickle.loads(data), bad=True,
                            loaders=("pickle.loads",)))
        out[-1].digest = hashlib.sha256(data).hexdigest()

    good_ckpt = d / "good.pt"
    torch.save({"w": torch.arange(6.0), "step": 7}, good_ckpt)
    out.append(Artifact("good.pt", good_ckpt, lambda: {k: (v.tolist() if hasattr(v, "tolist") else v)
                                                       for k, v in torch.load(good_ckpt, weights_only=False).items()},
                        expect={"w": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "step": 7}))
    bad_ckpt = d / "bad.pt"
    A.torch_save({"w": torch.zeros(2), "cfg": A.system_payload(str(markers / "bad.pt"))}, bad_ckpt)
    out.append(Artifact("bad.pt", bad_ckpt, lambda: torch.load(bad_ckpt, weights_only=False), bad=True,
                        loaders=("torch.load",)))
    nested = d / "nested.pt"
    inner = A.torch_bytes({"cfg": A.system_payload(str(markers / "nested"))})
    torch.save({"w": torch.zeros(1), "sub": A.nested_from_bytes(inner)}, nested)
    out.append(Artifact("nested.pt", nested, lambda: torch.load(nested, weights_only=False), bad=True,
                        loaders=("torch.load", "torch.load")))

    good_npy = d / "good.npy"
    np.save(good_npy, np.array([{"a": 1}, [2, 3]], dtype=object), allow_pickle=True)
    out.append(Artifact("good.npy", good_npy, lambda: np.load(good_npy, allow_pickle=True).tolist(),
                        expect=[{"a": 1}, [2, 3]]))
    bad_npy = d / "bad.npy"
    np.save(bad_npy, np.array([A.system_payload(str(markers / "bad.npy"))], dtype=object), allow_pickle=True)
    out.append(Artifact("bad.npy", bad_npy, lambda: np.load(bad_npy, allow_pickle=True), bad=True,
                        loaders=("numpy.load",)))

    good_jl = d / "good.joblib"
    joblib.dump({"coef": np.arange(4), "name": "lr"}, good_jl)
    out.append(Artifact("good.joblib", good_jl, lambda: (lambda r: {"coef": r["coef"].tolist(), "name": r["name"]})(
        joblib.load(good_jl)), expect={"coef": [0, 1, 2, 3], "name": "lr"}))
    bad_jl = d / "bad.joblib"
    joblib.dump({"coef": A.system_payload(str(markers / "bad.joblib"))}, bad_jl)
    out.append(Artifact("bad.joblib", bad_jl, lambda: joblib.load(bad_jl), bad=True, loaders=("joblib.load",)))
    return out, markers


def _check_refusal(art, exc, errors):
    decision = getattr(exc, "decision", None)
    if decision is None:  # a repeat within the same load carries no record; every load here is a new one
        errors.append(f"{art.name}: refusal without its decision: {exc}")
        return
    chain = [(f.loader, f.artifact) for f in decision.chain]
    if [c[0] for c in chain] != list(art.loaders):
        errors.append(f"{art.name}: loaders {chain}")
    if chain[0][1] != art.label:
        errors.append(f"{art.name}: attributed to {chain[0][1]}")
    digest = getattr(art, "digest", None)
    if digest and decision.chain[0].digest() != digest:
        errors.append(f"{art.name}: digest of another artifact")


def _load_once(art, errors, counts):
    try:
        value = art.load()
    except tmtguard.Violation as exc:
        if not art.bad:
            errors.append(f"{art.name} (good) refused: {str(exc).splitlines()[0]}")
        else:
            _check_refusal(art, exc, errors)
            counts["refused"] += 1
        return
    except SystemError as exc:
        if "AST constructor recursion depth mismatch" not in str(exc):
            errors.append(f"{art.name}: {type(exc).__name__}: {exc}")
        else:
            # CPython 3.11's AST constructor keeps its recursion depth in per-interpreter state, so
            # numpy's header parsing (ast.literal_eval) in many threads at once can trip it
            # (python/cpython#106905): counted, and bounded below, not tmtguard's decision path.
            counts["cpython_ast_race"] = counts.get("cpython_ast_race", 0) + 1
        return
    except Exception as exc:  # noqa: BLE001
        errors.append(f"{art.name}: {type(exc).__name__}: {exc}")
        return
    if art.bad:
        errors.append(f"{art.name} (bad) loaded")
    elif value != art.expect:
        errors.append(f"{art.name}: wrong value {value!r}")
    else:
        counts["loaded"] += 1


def _join_all(threads, timeout):
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    return alive


def test_threads_and_tasks_load_good_and_bad_together(guard, corpus):
    artifacts, markers = corpus
    events = guard()
    errors: list = []
    warm = {"loaded": 0, "refused": 0}
    for art in artifacts:  # one-time work (imports, the installed-distributions table) out of the clock
        _load_once(art, errors, warm)
    events.clear()
    stop_at = time.monotonic() + SECONDS
    barrier = threading.Barrier(THREADS + 1)
    per_worker: list = []

    def worker(offset):
        counts = {"loaded": 0, "refused": 0}
        per_worker.append(counts)
        barrier.wait(30)
        i = offset
        while time.monotonic() < stop_at:
            _load_once(artifacts[i % len(artifacts)], errors, counts)
            i += 1

    async def task(n, counts):
        # inside a custom guarded load, across awaits, while the other tasks interleave
        path = markers.parent / f"task{n}.bin"
        path.write_bytes(b"task")
        while time.monotonic() < stop_at:
            with tmtguard.guarded_load("task.load", str(path)):
                await asyncio.sleep(0)
                try:
                    pickle.loads(A.marker_pickle(str(markers / f"task{n}")))
                    errors.append(f"task{n}: bad load went through")
                except tmtguard.PickleViolation as exc:
                    chain = [(f.loader, f.artifact) for f in exc.decision.chain]
                    if chain != [("task.load", str(path))]:
                        errors.append(f"task{n}: chain {chain}")
                    counts["refused"] += 1
                await asyncio.sleep(0)
                if pickle.loads(pickle.dumps({"n": n})) != {"n": n}:
                    errors.append(f"task{n}: good load wrong")
                counts["loaded"] += 1

    def event_loop():
        counts = {"loaded": 0, "refused": 0}
        per_worker.append(counts)

        async def main():
            await asyncio.gather(*(task(n, counts) for n in range(TASKS)))

        barrier.wait(30)
        asyncio.run(main())

    threads = [threading.Thread(target=worker, args=(i,), name=f"loader-{i}") for i in range(THREADS)]
    threads.append(threading.Thread(target=event_loop, name="event-loop"))
    for t in threads:
        t.start()
    alive = _join_all(threads, SECONDS + JOIN_TIMEOUT)
    assert not alive, f"deadlock or hang: {alive}"

    assert errors == [], errors[:20]
    refused = sum(c["refused"] for c in per_worker)
    loaded = sum(c["loaded"] for c in per_worker)
    assert refused > THREADS and loaded > THREADS, (refused, loaded)
    races = sum(c.get("cpython_ast_race", 0) for c in per_worker)
    assert races * 100 <= refused + loaded, f"{races} CPython AST races in {refused + loaded} loads"
    assert not any(markers.iterdir()), "a payload ran"
    blocked = [e for e in events if e["decision"] == "blocked"]
    assert len(blocked) == refused, "one event per refused load"
    good = {a.label for a in artifacts if not a.bad}
    assert not [e for e in blocked if e["chain"][0]["artifact"] in good], "an event named a good artifact"
