"""Load frames and chains: isolation across threads and asyncio tasks, lazy digests, origins."""
from __future__ import annotations

import asyncio
import hashlib
import os
import pickle

import pytest

import artifacts as A
import tmtguard
from tmtguard import provenance


def test_asyncio_tasks_never_see_each_others_frames(guard, tmp_path, marker):
    events = guard()

    async def load_in(name: str, bad: bool):
        path = tmp_path / f"{name}.bin"
        path.write_bytes(b"x")
        with tmtguard.guarded_load("custom.load", str(path)):
            await asyncio.sleep(0.01)  # interleave with the other tasks while inside the load
            assert [f.artifact for f in provenance.chain()] == [str(path)]
            if bad:
                with pytest.raises(tmtguard.PickleViolation):
                    pickle.loads(A.marker_pickle(str(marker)))
            await asyncio.sleep(0.01)
            return [f.artifact for f in provenance.chain()]

    async def main():
        return await asyncio.gather(*(load_in(f"t{i}", i % 2 == 0) for i in range(10)))

    results = asyncio.run(main())
    assert results == [[str(tmp_path / f"t{i}.bin")] for i in range(10)]
    assert provenance.chain() == ()
    blocked = [e for e in events if e["action"] == "pickle.global"]
    assert len(blocked) == 5
    for e in blocked:
        # the unpickling a custom loader does is its own (adopted), so the chain is its one frame,
        # and it is the frame of this task's artifact, never another task's
        [frame] = e["chain"]
        assert frame["loader"] == "custom.load"
        assert int(os.path.basename(frame["artifact"])[1:-4]) % 2 == 0


def test_digest_is_cached_by_file_identity(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"hello")
    assert provenance.file_digest(str(p)) == hashlib.sha256(b"hello").hexdigest()
    p.write_bytes(b"hello, changed")  # new size and mtime: a new cache key
    assert provenance.file_digest(str(p)) == hashlib.sha256(b"hello, changed").hexdigest()


def test_event_digest_skips_huge_artifacts(tmp_path, monkeypatch):
    p = tmp_path / "big.bin"
    p.write_bytes(b"0" * 4096)
    monkeypatch.setattr(provenance, "EVENT_HASH_LIMIT", 1024)
    frame = provenance.LoadFrame("torch.load", str(p), path=str(p))
    assert frame.event_digest() is None, "never hash a large artifact just for a log line"
    assert frame.digest() == hashlib.sha256(b"0" * 4096).hexdigest(), "a rule that pins a digest still gets it"
    assert frame.event_digest() == frame.digest()


def test_origin_names_the_distribution_of_the_caller():
    import json.decoder

    torch = pytest.importorskip("torch")
    dist = provenance.distribution_of(torch.__file__)
    assert dist["name"] == "torch" and dist["version"].startswith("2.")
    assert provenance.distribution_of(json.decoder.__file__)["name"] == "python-stdlib"
    assert provenance.distribution_of("/nonexistent/dir/x.py") is None
    here = provenance.origin(1)
    assert here["file"] == __file__ and here["function"] == "test_origin_names_the_distribution_of_the_caller"


def test_chain_is_empty_again_after_blocked_and_allowed_loads(guard, marker):
    guard()
    with pytest.raises(tmtguard.PickleViolation):
        pickle.loads(A.marker_pickle(str(marker)))
    pickle.loads(pickle.dumps({"a": 1}))
    assert provenance.chain() == () and provenance._materialized == {}


@pytest.mark.parametrize("reader", ["C", "Python"])
def test_file_digest_of_a_fifo_is_none_without_waiting_for_a_writer(tmp_path, monkeypatch, reader):
    """Only a regular file has content to pin: a FIFO where a file should be gets no digest, and opening
    it must not block the load (nor take a writer's data)."""
    import threading

    from tmtguard import provenance

    if reader == "Python":
        monkeypatch.setattr(provenance, "_read_small", None)
    fifo = tmp_path / "model.bin"
    os.mkfifo(fifo)
    got = []
    t = threading.Thread(target=lambda: got.append(provenance.file_digest(str(fifo))), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "file_digest blocked on a FIFO"
    assert got == [None]


def test_the_path_caches_stay_out_of_the_young_generation(tmp_path):
    """The real-path folder cache (C) and the digest cache hold only atomic keys and values, which
    the cyclic collector untracks; a new entry must not track the whole cache again as a new object,
    or every young collection walks all of it once per model load (each load adds files and folders)."""
    pytest.importorskip("tmtguard._auditfast")
    import gc

    files = []
    for i in range(300):
        folder = tmp_path / f"d{i}"
        folder.mkdir()
        (folder / "f.py").write_text(f"x = {i}\n")
        files.append(str(folder / "f.py"))
    gc.collect()
    gc.disable()  # no automatic collection in between: what the next one would find young
    try:
        for f in files:
            assert provenance.realpath(f) == os.path.realpath(f)
            assert provenance.file_digest(f) == hashlib.sha256(open(f, "rb").read()).hexdigest()
        big = [(type(o).__name__, len(o)) for o in gc.get_objects(0) if isinstance(o, (dict, list, set)) and len(o) >= 300]
    finally:
        gc.enable()
    assert big == []
