"""torch.load of a checkpoint holding thousands of small tensors (full unpickling).

Per-tensor overhead dominates: every tensor is a REDUCE of torch._utils._rebuild_tensor_v2 plus a
persistent_load of its storage, so this is the workload most sensitive to a guard's per-global or
per-object hooks during unpickling.
"""

from __future__ import annotations

import os
from pathlib import Path

NAME = "torch_load_many"
N_TENSORS = 3000
TITLE = f"torch.load, {N_TENSORS:,} small tensors (weights_only=False)"
BUDGET = 1.05
PEERS = ("weights_only", "fickling", "picklescan", "modelscan")
REPS = 15
QUICK_REPS = 5
KIND = "inprocess"

_SHAPES = ((32, 32), (32,), (8, 32), (32, 8))


def prepare(cache_dir: Path) -> dict:
    from benchmarks._common import atomic_target

    path = cache_dir / f"many_{N_TENSORS}.pt"
    if not path.exists():
        import collections

        import torch

        g = torch.Generator().manual_seed(0)
        sd = collections.OrderedDict(
            (f"blocks.{i // 4}.param{i % 4}", torch.randn(*_SHAPES[i % 4], generator=g))
            for i in range(N_TENSORS)
        )
        tmp = atomic_target(path)
        torch.save(sd, tmp)
        os.replace(tmp, path)
    return {"path": str(path)}


def setup(params: dict, config: str):
    import torch

    path = params["path"]

    def expect(sd) -> None:
        if len(sd) != N_TENSORS:
            raise AssertionError(f"loaded {len(sd)} entries, expected {N_TENSORS}")

    if config == "weights_only":

        def run():
            expect(torch.load(path, weights_only=True))

    elif config == "picklescan":
        from benchmarks.peers import picklescan_check_file

        def run():
            picklescan_check_file(path)
            expect(torch.load(path, weights_only=False))

    elif config == "modelscan":
        from benchmarks.peers import modelscan_check_file

        def run():
            modelscan_check_file(path)
            expect(torch.load(path, weights_only=False))

    else:  # baseline, guarded configs, and fickling (whose hook replaces pickle.Unpickler)
        if config == "fickling":
            from benchmarks.peers import fickling_activate

            fickling_activate()

        def run():
            expect(torch.load(path, weights_only=False))

    return run
