"""Real torch, numpy and joblib artifacts: nested loads carry the whole chain."""
from __future__ import annotations

import hashlib
import os

import pytest

import artifacts as A
import tmtguard
from conftest import write_allowlist

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
joblib = pytest.importorskip("joblib")


@pytest.fixture(scope="module")
def benign_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "benign.pt"
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    torch.save({"model": model.state_dict(), "step": 3, "opt": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()}, path)
    return path


def test_benign_checkpoint_loads_fully_and_weights_only(guard, benign_ckpt):
    events = guard()
    full = torch.load(benign_ckpt, weights_only=False)
    safe = torch.load(benign_ckpt, weights_only=True)
    assert torch.equal(full["model"]["0.weight"], safe["model"]["0.weight"])
    assert events == []


def test_torch_checkpoint_payload_runs_unguarded(unguarded, tmp_path, marker):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "cfg": A.system_payload(str(marker))}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_torch_checkpoint_payload_blocked(guard, tmp_path, marker):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "cfg": A.system_payload(str(marker))}, path)
    events = guard()
    with pytest.raises(tmtguard.PickleViolation, match="posix:system"):
        torch.load(path, weights_only=False)
    assert not marker.exists()
    [ev] = events
    assert ev["chain"] == [{"loader": "torch.load", "artifact": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]


def test_raw_pickle_named_pt_blocked_in_legacy_path(guard, tmp_path, marker):
    path = tmp_path / "legacy.pt"
    path.write_bytes(A.marker_pickle(str(marker)))
    events = guard()
    with pytest.raises(tmtguard.PickleViolation):
        torch.load(path, weights_only=False)
    assert not marker.exists()
    assert [f["loader"] for f in events[-1]["chain"]] == ["torch.load"], "the unpickler adopts torch.load's frame"


def _from_bytes_chain(marker, depth):
    obj = {"w": torch.ones(2), "cfg": A.system_payload(str(marker))}
    for _ in range(depth - 1):
        obj = {"w": torch.zeros(3), "nested": A.nested_from_bytes(A.torch_bytes(obj))}
    return obj


@pytest.mark.parametrize("depth", [2, 3])
def test_nested_load_from_bytes(guard, tmp_path, marker, depth):
    path = tmp_path / "outer.pt"
    torch.save(_from_bytes_chain(marker, depth), path)
    events = guard()
    with pytest.raises(tmtguard.PickleViolation) as info:
        torch.load(path, weights_only=False)
    assert not marker.exists()
    chain = events[-1]["chain"]
    assert [f["loader"] for f in chain] == ["torch.load"] * depth
    assert chain[0]["artifact"] == str(path)
    assert all(f["artifact"].startswith("<bytes:") and len(f["sha256"]) == 64 for f in chain[1:])
    assert str(info.value).count(" -> ") == depth - 1


def test_nested_load_from_bytes_payload_runs_unguarded(unguarded, tmp_path, marker):
    path = tmp_path / "outer.pt"
    torch.save(_from_bytes_chain(marker, 3), path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def _file_chain(tmp_path, marker, depth):
    inner = tmp_path / "level1.pt"
    torch.save({"w": torch.ones(2), "cfg": A.system_payload(str(marker))}, inner)
    paths = [inner]
    for level in range(2, depth + 1):
        p = tmp_path / f"level{level}.pt"
        A.torch_save({"w": torch.ones(2), "nested": A.nested_torch_load(str(paths[-1]))}, p)
        paths.append(p)
    return list(reversed(paths))  # outermost first


@pytest.mark.parametrize("depth", [2, 3])
def test_nested_torch_load_of_files_without_the_loader_allowlisted(guard, tmp_path, marker, depth):
    paths = _file_chain(tmp_path, marker, depth)
    events = guard()
    with pytest.raises(tmtguard.PickleViolation, match="torch.serialization:load"):
        torch.load(paths[0], weights_only=False)
    assert [f["artifact"] for f in events[-1]["chain"]] == [str(paths[0])]
    assert not marker.exists()


@pytest.mark.parametrize("depth", [2, 3])
def test_nested_torch_load_of_files_with_the_loader_allowlisted(guard, tmp_path, marker, depth):
    paths = _file_chain(tmp_path, marker, depth)
    scoped = "".join(
        f"  - match: {{path: '{p}'}}\n    pickle:\n      allow: [torch.serialization:load, torch.serialization:pickle]\n"
        for p in paths[:-1]
    )
    events = guard(allowlists=[write_allowlist(tmp_path / "a.yaml", "version: 1\nartifacts:\n" + scoped)])
    with pytest.raises(tmtguard.PickleViolation, match="posix:system"):
        torch.load(paths[0], weights_only=False)
    assert not marker.exists()
    assert [f["artifact"] for f in events[-1]["chain"]] == [str(p) for p in paths]


def test_nested_torch_load_of_files_payload_runs_unguarded(unguarded, tmp_path, marker):
    paths = _file_chain(tmp_path, marker, 3)
    torch.load(paths[0], weights_only=False)
    assert marker.exists()


def test_mmap_load_is_not_hashed(guard, tmp_path):
    path = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(1024, 1024)}, path)
    from tmtguard import provenance

    before = dict(provenance._digest_cache)
    out = torch.load(path, mmap=True, weights_only=False)
    assert out["w"].shape == (1024, 1024)
    assert provenance._digest_cache == before, "a load with no decision to make must not hash the file"


# --- numpy -------------------------------------------------------------------------------------------


def test_numpy_object_array_payload(guard, tmp_path, marker):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([A.system_payload(str(marker))], dtype=object), allow_pickle=True)
    events = guard()
    with pytest.raises(tmtguard.PickleViolation, match="posix:system"):
        np.load(path, allow_pickle=True)
    assert not marker.exists()
    assert [f["loader"] for f in events[-1]["chain"]] == ["numpy.load"]
    assert events[-1]["chain"][0]["artifact"] == str(path)


def test_numpy_payload_runs_unguarded(unguarded, tmp_path, marker):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([A.system_payload(str(marker))], dtype=object), allow_pickle=True)
    np.load(path, allow_pickle=True)
    assert marker.exists()


def test_numpy_benign_object_and_pickled_arrays(guard, tmp_path):
    events = guard()
    path = tmp_path / "ok.npy"
    np.save(path, np.array([{"a": 1}, [1, 2]], dtype=object), allow_pickle=True)
    assert np.load(path, allow_pickle=True)[0] == {"a": 1}
    import pickle

    arr = np.arange(10.0)
    assert (pickle.loads(pickle.dumps({"a": arr, "s": np.float32(2)}))["a"] == arr).all()
    assert events == []


def test_numpy_load_inside_a_checkpoint(guard, tmp_path, marker):
    inner = tmp_path / "inner.npy"
    np.save(inner, np.array([A.system_payload(str(marker))], dtype=object), allow_pickle=True)
    outer = tmp_path / "outer.pt"
    torch.save({"w": torch.ones(1), "extra": A.Reduce(np.load, str(inner), None, True)}, outer)
    events = guard(allowlists=[write_allowlist(tmp_path / "a.yaml", f"version: 1\nartifacts:\n  - match: {{path: '{outer}'}}\n    pickle:\n      allow: [numpy:load]\n")])
    with pytest.raises(tmtguard.PickleViolation, match="posix:system"):
        torch.load(outer, weights_only=False)
    assert [(f["loader"], f["artifact"]) for f in events[-1]["chain"]] == [("torch.load", str(outer)), ("numpy.load", str(inner))]
    assert not marker.exists()


# --- joblib ------------------------------------------------------------------------------------------


def test_joblib_benign_and_malicious(guard, tmp_path, marker):
    ok = tmp_path / "ok.joblib"
    joblib.dump({"a": np.arange(5), "o": np.array([1, None], dtype=object)}, ok)
    bad = tmp_path / "bad.joblib"
    joblib.dump({"a": np.arange(5), "cfg": A.system_payload(str(marker))}, bad)
    events = guard()
    assert list(joblib.load(ok)["a"]) == [0, 1, 2, 3, 4]
    assert events == []
    with pytest.raises(tmtguard.PickleViolation, match="posix:system"):
        joblib.load(bad)
    assert not marker.exists()
    assert events[-1]["chain"][0] == {"loader": "joblib.load", "artifact": str(bad), "sha256": hashlib.sha256(bad.read_bytes()).hexdigest()}


def test_joblib_payload_runs_unguarded(unguarded, tmp_path, marker):
    bad = tmp_path / "bad.joblib"
    joblib.dump({"cfg": A.system_payload(str(marker))}, bad)
    joblib.load(bad)
    assert marker.exists()


# --- DataLoader workers send tensors back through pickles ----------------------------------------------


class _Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"x": torch.full((3,), float(i)), "i": i}


def test_dataloader_with_worker_processes(guard):
    events = guard()
    seen = []
    for batch in torch.utils.data.DataLoader(_Squares(), batch_size=4, num_workers=2):
        seen.extend(batch["i"].tolist())
    assert sorted(seen) == list(range(16))
    assert events == []
