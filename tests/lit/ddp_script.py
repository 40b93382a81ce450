"""Run by tests/lit/test_ddp.py: train a tiny GPT with 1 or 2 CPU processes (gloo) at the same
global batch and save the final parameters and the per-step global losses."""

import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_optlab import OptimizerSpec
from lightning_optlab.lit import CausalLMModule
from lightning_optlab.models import GPT, GPTConfig


class Recorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().clone()
        if trainer.world_size > 1:  # the global batch's loss: the mean of the ranks' means
            torch.distributed.all_reduce(loss)
            loss /= trainer.world_size
        self.losses.append(loss.item())


def main(devices: int, optimizer: str, out: str) -> None:
    global_batch = 8
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (6 * global_batch, 17), generator=g)

    class Data(L.LightningDataModule):
        # explicit sampler: rank r takes samples r, r + world, ... so a global batch holds the
        # same samples as the single-process batch
        def train_dataloader(self):
            sampler = DistributedSampler(list(tokens), num_replicas=self.trainer.world_size,
                                         rank=self.trainer.global_rank, shuffle=False)
            return DataLoader(list(tokens), batch_size=global_batch // devices, sampler=sampler)

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    spec = OptimizerSpec(name=optimizer, lr=3e-3, schedule="cosine", warmup_steps=1, total_steps=6)
    module = CausalLMModule(model, spec)
    rec = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[rec], use_distributed_sampler=False)
    trainer.fit(module, datamodule=Data())
    if trainer.global_rank == 0:
        torch.save({"losses": rec.losses, "params": {k: v.detach().clone() for k, v in model.state_dict().items()}}, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
