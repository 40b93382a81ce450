"""Run by tests/lit/test_fsdp.py: tiny models trained by one plain process or by 2 CPU processes under
Lightning's ModelParallelStrategy (FSDP2, gloo), launched with torchrun; the results are saved for the test.

    python fsdp_script.py parity OUT OPT[,OPT...]        # one process, plain
    torchrun --nproc_per_node 2 fsdp_script.py parity OUT OPT[,OPT...]
    torchrun --nproc_per_node 2 fsdp_script.py resume OUT DIR
    torchrun --nproc_per_node 2 fsdp_script.py init OUT

Every run sees the same global batch: an explicit DistributedSampler gives rank r the samples
r, r + world, ... of the single-process batch.
"""

from __future__ import annotations

import os
import sys
import traceback

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: DCP's load failures
from torch.utils.data import DataLoader, DistributedSampler

from lightning_optlab import OptimizerSpec
from lightning_optlab.lit import CausalLMModule
from lightning_optlab.models import build_model
from lightning_optlab.mup import build_mup_model

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
STEPS = 8
GLOBAL_BATCH = 8
MODEL = {"family": "gpt2", "vocab_size": 32, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}
MUP_BASE = 8  # μP relative to the same model at width 8
LLAMA = {"family": "llama", "vocab_size": 32, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}


def hf_llama():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg)


def full_params(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Every parameter as a whole tensor (a collective under FSDP2: every rank calls it)."""
    out = {}
    for name, p in module.model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().clone().cpu()
    return out


class Recorder(L.Callback):
    """Per-step global losses, and the whole parameters at the start and the end of training."""

    def __init__(self):
        self.losses, self.start, self.end = [], None, None

    def on_train_start(self, trainer, pl_module):
        self.start = full_params(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().clone()
        if trainer.world_size > 1:  # the global batch's loss: the mean of the ranks' means
            torch.distributed.all_reduce(loss)
            loss /= trainer.world_size
        self.losses.append(loss.item())

    def on_train_end(self, trainer, pl_module):
        self.end = full_params(pl_module)


class Data(L.LightningDataModule):
    def __init__(self, n_batches: int = STEPS):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tokens = list(torch.randint(0, 32, (n_batches * GLOBAL_BATCH, 17), generator=g))

    def train_dataloader(self):
        sampler = DistributedSampler(self.tokens, num_replicas=self.trainer.world_size,
                                     rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(self.tokens, batch_size=GLOBAL_BATCH // self.trainer.world_size, sampler=sampler)


DDP = False  # parity under DDP instead of FSDP2


def trainer(max_steps: int, callbacks=(), precision="32-true", **kwargs) -> L.Trainer:
    strategy = ("ddp" if DDP else ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1))
    strategy = strategy if WORLD > 1 else "auto"
    defaults = dict(logger=False, enable_checkpointing=False)
    defaults.update(kwargs)
    return L.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, precision=precision, max_steps=max_steps,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                     use_distributed_sampler=False, num_sanity_val_steps=0, **defaults)


# what an optimizer needs beyond the common spec
EXTRA = {
    "adam_mini": {"hparams": {"n_heads": 2}},
    "muon": {"lr": 0.02, "mix": [{"optimizer": "adamw", "roles": ["embedding", "readout", "norm", "bias"], "lr": 3e-3}]},
    "schedule_free_adamw": {"schedule": "constant"},  # it replaces the schedule
    # refreshes at steps 3 and 6 of the 8 (and the first step's initialization)
    "soap": {"hparams": {"precondition_frequency": 3}},
    "shampoo": {"hparams": {"precondition_frequency": 3}},
}


def spec(name: str) -> OptimizerSpec:
    kwargs = {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 1, "total_steps": STEPS, **EXTRA.get(name, {})}
    return OptimizerSpec(name=name, **kwargs)


def parity(out: str, names: str, strategy: str = "fsdp") -> None:
    """Every optimizer of ``names`` for 8 steps; with 2 processes under FSDP2 or under DDP (``strategy``)."""
    global DDP
    DDP = strategy == "ddp"
    results = {}
    for entry in names.split(","):
        # "adamw:llama" trains the LLaMA model, "adamw:mup" the GPT in μP, "adamw:hf" a Hugging Face
        # LlamaForCausalLM (an nn.Module: sharded per decoder layer as given), "adamw:f32" in float32
        name, _, variant = entry.partition(":")
        torch.set_default_dtype(torch.float32 if variant == "f32" else torch.float64)
        L.seed_everything(0, verbose=False)
        model = hf_llama() if variant == "hf" else LLAMA if variant == "llama" else MODEL
        module = CausalLMModule(model, spec(name), mup=MUP_BASE if variant == "mup" else None,
                                fsdp={"init": "full"} if WORLD > 1 and not DDP else None)
        rec = Recorder()
        try:
            trainer(STEPS, [rec]).fit(module, datamodule=Data())
            results[entry] = {"losses": rec.losses, "start": rec.start, "end": rec.end}
        except (Exception, CheckpointException) as err:  # e.g. "needs whole tensors": recorded for the test to judge
            results[entry] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    torch.set_default_dtype(torch.float64)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)


def init_check(out: str) -> None:
    """The whole initial weights of meta-device init (the default) and of init="full", 2 processes."""
    results = {}
    for mode in ("meta", "full"):
        L.seed_everything(0, verbose=False)
        module = CausalLMModule(MODEL, spec("adamw"), fsdp={"init": mode})
        rec = Recorder()
        t = trainer(1, [rec])
        t.fit(module, datamodule=Data())
        results[mode] = rec.start
        names = [n for n, _ in module.model.named_parameters()]
        results[mode + "_names"] = names
        opt = t.optimizers[0]
        results[mode + "_groups"] = [(g.get("role"), g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    L.seed_everything(0, verbose=False)
    module = CausalLMModule(MODEL, spec("adamw"), mup=MUP_BASE)  # μP, meta init (the default)
    rec = Recorder()
    trainer(1, [rec]).fit(module, datamodule=Data())
    results["mup_meta"] = rec.start
    results["mup_infshape"] = {n: str(p.infshape) for n, p in module.model.named_parameters()}
    L.seed_everything(0, verbose=False)
    results["plain"] = {n: p.detach().clone() for n, p in build_model(MODEL).named_parameters()}
    L.seed_everything(0, verbose=False)
    results["mup_plain"] = {n: p.detach().clone() for n, p in build_mup_model(MODEL, base=MUP_BASE).named_parameters()}
    # bad input: ModelParallelStrategy's default mesh on one node is all tensor parallel
    try:
        L.Trainer(accelerator="cpu", devices=WORLD, strategy=ModelParallelStrategy(), max_steps=1, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False).fit(
            CausalLMModule(MODEL, spec("adamw")), datamodule=Data())
        results["tp_error"] = None
    except ValueError as err:
        results["tp_error"] = str(err)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)


def full_optimizer_state(trainer_: L.Trainer) -> dict:
    """The optimizer state with whole tensors, keyed by parameter name (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    module, opt = trainer_.lightning_module, trainer_.optimizers[0]
    if WORLD == 1 and not isinstance(trainer_.strategy, ModelParallelStrategy):
        names = {id(p): n for n, p in module.named_parameters()}
        state = {names[id(p)]: dict(s) for p, s in opt.state.items()}
        return {"state": state, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}
    sd = get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"state": sd.get("state", {}), "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                          for g in sd.get("param_groups", [])]}


def resume(out: str, ckpt_dir: str, names: str = "adamw,sophia") -> None:
    """Per optimizer: 8 uninterrupted steps; 4 steps saving a distributed checkpoint; a resume to 8."""
    results = {}
    for name in names.split(","):
        try:
            results[name] = _resume_runs(name, ckpt_dir)
        except (Exception, CheckpointException) as err:  # recorded for the test to judge (every rank fails alike)
            results[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)


def _resume_runs(name: str, ckpt_dir: str) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    runs = {}
    for phase in ("full", "first", "resumed"):
        L.seed_everything(0, verbose=False)
        module = CausalLMModule(MODEL, spec(name), fsdp={"init": "full"})
        rec = Recorder()
        callbacks = [rec]
        if phase == "first":
            callbacks.append(ModelCheckpoint(dirpath=f"{ckpt_dir}/{name}", every_n_train_steps=4, save_top_k=-1))
        t = trainer(4 if phase == "first" else STEPS, callbacks, enable_checkpointing=phase == "first")
        # 4 batches an epoch: the checkpoint falls on an epoch's end, so the resume's data are the run's
        t.fit(module, datamodule=Data(n_batches=4),
              ckpt_path=f"{ckpt_dir}/{name}/epoch=0-step=4.ckpt" if phase == "resumed" else None)
        runs[phase] = {"losses": rec.losses, "end": rec.end, "opt": full_optimizer_state(t),
                       "global_step": t.global_step}
    return runs


def resume_other_world(out: str, ckpt_dir: str, names: str = "adamw,sophia") -> None:
    """The 2-process checkpoints resumed by this many processes (under ModelParallelStrategy)."""
    from lightning_optlab.callbacks.resume import ResumeCheck, SafeCheckpointIO

    results = {}
    for entry in names.split(","):
        # "name" resumes under ModelParallelStrategy; "name:plain" under the default strategy, with the
        # pack's SafeCheckpointIO (it reads the shards whole) and ResumeCheck
        name, _, how = entry.partition(":")
        L.seed_everything(0, verbose=False)
        plain = how == "plain"
        module = CausalLMModule(MODEL, spec(name), fsdp=None if plain else {"init": "meta"})
        rec = Recorder()
        strategy = "auto" if plain else ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
        t = L.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=STEPS, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[rec, ResumeCheck()], use_distributed_sampler=False,
                      plugins=[SafeCheckpointIO()] if plain else None)
        try:
            t.fit(module, datamodule=Data(n_batches=4), ckpt_path=f"{ckpt_dir}/{name}/epoch=0-step=4.ckpt")
            results[entry] = {"losses": rec.losses, "end": rec.end, "opt": full_optimizer_state(t)}
        except (Exception, CheckpointException) as err:
            results[entry] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)


class MemoryLogger(Logger):
    """Keeps what is logged (rank zero)."""

    def __init__(self):
        super().__init__()
        self.metrics: dict[str, float] = {}

    name, version = "memory", 0

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class Poison(L.Callback):
    """Puts a NaN into one parameter's gradient on one rank only (its shard under FSDP2), after the
    gradients were reduced: only that rank sees it."""

    def __init__(self, step: int, rank: int = 1):
        self.step, self.rank = step, rank

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            g = pl_module.model.blocks[0].mlp.up_proj.weight.grad
            (g.to_local() if hasattr(g, "to_local") else g).view(-1)[0] = float("nan")


def _all(value):
    """Every rank's ``value`` (rank order)."""
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def callbacks_check(out: str, ckpt_dir: str) -> None:
    """NonFiniteGuard, WallClock and PreconditionerHealth on 2 ranks, under FSDP2 and under DDP."""
    from lightning_optlab.callbacks import NonFiniteGuard, PreconditionerHealth, StabilityMonitor, WallClock
    from lightning_optlab.callbacks.health import _merge_over_ranks

    results = {}
    rank = int(os.environ["RANK"])
    for strategy in ("fsdp", "ddp"):
        for action in ("skip", "stop"):
            L.seed_everything(0, verbose=False)
            module = CausalLMModule(MODEL, spec("adamw"), fsdp={"init": "full"} if strategy == "fsdp" else None)
            guard = NonFiniteGuard(action=action, check_every_n_steps=1, dirpath=f"{ckpt_dir}/{strategy}-{action}")
            clock = WallClock(log_every_n_steps=2, verbose=False)
            # the plot at fit end asks for the log folder, a broadcast: it must not be asked on rank zero alone
            health = PreconditionerHealth(every_n_steps=2, plot=action == "skip", per_parameter=True)
            stability = StabilityMonitor(every_n_steps=2, relative_updates=True)  # measured beside the health one
            logger = MemoryLogger()
            t = _trainer_for(strategy, 6, [Poison(step=2), guard, clock, health, stability], logger)
            t.fit(module, datamodule=Data(n_batches=6))
            weights = {n: v.sum().item() for n, v in full_params(module).items()}
            results[(strategy, action)] = {
                "events": _all(guard.events), "global_step": _all(t.global_step),
                "saved": _all(guard.saved_checkpoints), "weights": _all(weights),
                "rank_seconds": _all(clock.rank_seconds),
                "logged": logger.metrics if rank == 0 else None,
                "plot": str(health.written_plot) if rank == 0 and health.written_plot else None,
            }
    merged = _merge_over_ranks({f"owned{rank}": {"cond": float(rank)}, "shared": {"x": float(rank)}},
                               {f"owned{rank}": "hidden", "shared": "norm"}, None)
    results["merge"] = merged
    if rank == 0:
        torch.save(results, out)


def _trainer_for(strategy: str, max_steps: int, callbacks, logger) -> L.Trainer:
    if strategy == "fsdp":
        return trainer(max_steps, callbacks, logger=logger, log_every_n_steps=1)
    return L.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", max_steps=max_steps, logger=logger,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=list(callbacks), use_distributed_sampler=False, log_every_n_steps=1)


if __name__ == "__main__":
    mode, out, *rest = sys.argv[1:]
    # float64 through and through (ModelParallelStrategy refuses precision="64-true": the models are
    # built in the default dtype, and the loss keeps float64 logits in float64)
    torch.set_default_dtype(torch.float64)
    modes = {"parity": parity, "init": init_check, "resume": resume, "resume_other_world": resume_other_world,
             "callbacks": callbacks_check}
    modes[mode](out, *rest)
