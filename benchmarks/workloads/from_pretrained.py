"""AutoModel.from_pretrained of a tiny BERT from a local folder (safetensors, no network).

The folder is built once with a tiny BertConfig + save_pretrained under benchmarks/.cache/.
What is timed is what an inference server does per model load: config parsing, auto-class
resolution, model construction and safetensors weight loading. Imports are done in setup (the
start-up workload covers import cost).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

NAME = "from_pretrained"
TITLE = "AutoModel.from_pretrained, tiny BERT from a local folder"
BUDGET = 1.05
PEERS = ()
REPS = 30
QUICK_REPS = 10
KIND = "inprocess"

CONFIG = dict(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
)


def prepare(cache_dir: Path) -> dict:
    folder = cache_dir / "tiny-bert"
    if not (folder / "config.json").exists():
        import torch
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        tmp = cache_dir / f".tiny-bert.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        BertModel(BertConfig(**CONFIG)).save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return {"folder": str(folder)}


def setup(params: dict, config: str):
    import torch  # noqa: F401
    from transformers import AutoModel
    from transformers.models.bert import modeling_bert  # noqa: F401  (import cost not timed)

    folder = params["folder"]

    def run():
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        assert model.config.hidden_size == CONFIG["hidden_size"]

    return run
