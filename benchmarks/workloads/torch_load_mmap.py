"""torch.load(mmap=True, weights_only=False) of a ~200 MB checkpoint.

With mmap the storages are mapped, not read, so the time is the zip directory walk, the unpickling
of ~100 tensors and the mmap set-up: a guard that hashes or reads the whole file on open would show
up here immediately.
"""

from __future__ import annotations

import os
from pathlib import Path

NAME = "torch_load_mmap"
N_TENSORS = 100
TENSOR_BYTES = 2_000_000  # 100 x 2 MB = 200 MB of float32 data
TITLE = "torch.load(mmap=True), 200 MB checkpoint (weights_only=False)"
BUDGET = 1.05
PEERS = ("weights_only", "fickling", "picklescan", "modelscan")
REPS = 50
QUICK_REPS = 15
KIND = "inprocess"


def prepare(cache_dir: Path) -> dict:
    from benchmarks._common import atomic_target

    path = cache_dir / "big_200MB.pt"
    if not path.exists():
        import collections

        import torch

        g = torch.Generator().manual_seed(1)
        n = TENSOR_BYTES // 4
        sd = collections.OrderedDict()
        for i in range(N_TENSORS):
            # A few shapes, like a transformer layer stack; all 2 MB.
            shape = (1000, n // 1000) if i % 2 else (n,)
            sd[f"layers.{i // 4}.w{i % 4}"] = torch.randn(*shape, generator=g)
        tmp = atomic_target(path)
        torch.save(sd, tmp)
        os.replace(tmp, path)
    return {"path": str(path), "bytes": path.stat().st_size}


def setup(params: dict, config: str):
    import torch

    path = params["path"]

    def expect(sd) -> None:
        if len(sd) != N_TENSORS:
            raise AssertionError(f"loaded {len(sd)} entries, expected {N_TENSORS}")

    # Bring the file into the page cache once, outside the timing, so every configuration (and
    # every round) measures the same warm-cache load.
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass

    if config == "weights_only":

        def run():
            expect(torch.load(path, mmap=True, weights_only=True))

    elif config == "picklescan":
        from benchmarks.peers import picklescan_check_file

        def run():
            picklescan_check_file(path)
            expect(torch.load(path, mmap=True, weights_only=False))

    elif config == "modelscan":
        from benchmarks.peers import modelscan_check_file

        def run():
            modelscan_check_file(path)
            expect(torch.load(path, mmap=True, weights_only=False))

    else:
        if config == "fickling":
            from benchmarks.peers import fickling_activate

            fickling_activate()

        def run():
            expect(torch.load(path, mmap=True, weights_only=False))

    return run
