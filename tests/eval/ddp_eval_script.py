"""Run by tests/eval/test_callback.py: a tiny GPT trained for 2 steps by 1 or 2 CPU processes (gloo),
with ZeroShotEval on the sample tasks (sharded across ranks, and on rank 0 alone); saves the histories."""

import json
import sys

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_optlab.configure import OptimizerSpec
from lightning_optlab.data.tokenizer import ByteTokenizer
from lightning_optlab.eval import ZeroShotEval
from lightning_optlab.lit import CausalLMModule
from lightning_optlab.models import GPT, GPTConfig


def main(devices: int, task_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = CausalLMModule(GPT(GPTConfig(vocab_size=257, block_size=64, n_layer=1, n_head=2, n_embd=16)),
                            OptimizerSpec(name="adamw", lr=1e-3))
    module.tokenizer = ByteTokenizer()
    data = DataLoader(list(torch.randint(0, 257, (8, 17))), batch_size=2)
    # sharded after every step; rank 0 alone at fit end (step 2): both must give the same numbers
    shard = ZeroShotEval(["arc_easy", "mmlu"], task_dir=task_dir, every_n_steps=1, results_dir=out + "_shard")
    rank0 = ZeroShotEval(["arc_easy", "mmlu"], task_dir=task_dir, distributed="rank_zero", results_dir=out + "_rank0")
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=2,
                        logger=CSVLogger(out + "_logs"), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[shard, rank0])
    trainer.fit(module, data)
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump({"shard": shard.history, "rank0": rank0.history, "world_size": trainer.world_size}, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
