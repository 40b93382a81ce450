"""``CausalLMModule``: next-token training of any logits-producing model with an ``OptimizerSpec``."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from ..configure import OptimizerSpec, configure
from ..optim.base import run_training_step_hooks
from .fsdp import FSDPConfig, init_sharded, is_sharded, param_attrs, reattach_param_attrs, shard_model

__all__ = ["CausalLMModule", "logits_of"]


def logits_of(output: Any) -> Tensor:
    """The ``(B, T, V)`` logits in a model's output: a tensor, the first element of a tuple/list, or
    ``output.logits`` (Hugging Face's ``CausalLMOutput...``)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"the model returned {type(output).__name__}, not logits: CausalLMModule takes a model whose forward(ids) "
        "returns the (B, T, V) logits as a tensor, a tuple starting with them, or an object with `.logits`"
    )


class CausalLMModule(L.LightningModule):
    """Trains a language model on batches of token ids ``(B, T + 1)``.

    Args:
        model: an ``nn.Module`` mapping ``(B, T)`` token ids to ``(B, T, V)`` logits, or a model
            preset name / config / mapping for :func:`lightning_optlab.models.build_model`, built in
            ``configure_model`` with the datamodule's ``vocab_size`` when it has one. If the model
            has ``loss(logits, targets)`` (z-loss, ...) that is the training loss.
        optimizer: the :class:`OptimizerSpec` (name, lr, betas, schedule, per-role overrides, mix).
        sophia_seed: seed of the label sampling of Sophia-G's estimator (offset by the step).
        mup: μP's base: a base width, the proxy (preset name / config / mapping), or ``{"base": ...}`` as
            ``optlab mup transfer`` writes it, with optionally ``depth`` (``none``, ``depth_mup``,
            ``completep``: :mod:`lightning_optlab.mup.depth`) and ``base_depth`` (default the proxy's
            depth); the depth setting is stored in checkpoints and a resume with another one fails. A preset model is then built by
            :func:`lightning_optlab.mup.build_mup_model` in ``configure_model`` (μP config, base shapes,
            fan-in init) and the optimizer spec gets ``mup=True``. The base shapes are recomputed from
            the config at every start and stored in checkpoints; a resume with other base shapes fails.
            With an ``nn.Module`` model, ``mup`` is a base ``nn.Module`` (the same architecture at
            the base width, e.g. built on ``meta``) or a base-shapes mapping (see
            :func:`lightning_optlab.mup.set_base_shapes`); the shapes are attached as given, with no
            re-initialization and no readout multiplier (the optimizer then refuses μP unless the
            model has one). For a Hugging Face model built from its config, ``mup`` may be the base
            width (an int): :func:`lightning_optlab.mup.hf_to_mup` then swaps in mup's readout,
            takes the base shapes from the model's config at that width (built on ``meta``) and
            rescales the hidden init, in place.
        tokenizer: the model's own tokenizer (a ``transformers`` tokenizer or a
            :class:`~lightning_optlab.data.TextTokenizer`), kept as ``self.tokenizer`` for the
            zero-shot evaluation and ``optlab export``; without one these use the datamodule's.
        fsdp: how to shard under Lightning's ``ModelParallelStrategy`` (FSDP2): an
            :class:`~lightning_optlab.lit.FSDPConfig`, a mapping of its fields (YAML), or None (its
            defaults). The module shards only when the trainer's strategy is ``ModelParallelStrategy``
            (``data_parallel_size`` = the number of processes, ``tensor_parallel_size=1``); then
            ``configure_model`` applies ``fully_shard`` to every transformer block and the root, a preset
            model being built on ``meta`` and initialized on its shards (``fsdp.init``). See docs/distributed.md.

    Any model works whose ``forward(ids)`` returns the logits as a tensor, a tuple starting with
    them, or an object with ``.logits`` (Hugging Face causal LMs: ``LlamaForCausalLM``,
    ``GPT2LMHeadModel``, ...; they are called with ``use_cache=False``). The loss is the pack's
    shifted-target cross-entropy on batches ``(B, T + 1)``, not the model's own ``labels`` loss.

    The hyperparameters (``hparams.yaml``) hold the optimizer spec beside the model, and
    ``hp_metric`` is the latest validation loss, so TensorBoard's HPARAMS view compares runs.
    Logs ``train/loss``, ``train/tokens`` (tokens seen, all ranks), ``val/loss`` and ``val/ppl``
    (token-weighted, through torchmetrics). Each optimizer's declared training-step hook runs between
    the forward pass and the backward (Sophia's curvature estimate from the step's own logits every
    ``update_period`` steps; a no-op for optimizers that declare none).
    """

    def __init__(self, model: nn.Module | str | Mapping[str, Any] | Any, optimizer: OptimizerSpec | None = None,
                 sophia_seed: int = 0, mup: Any = None, tokenizer: Any = None,
                 fsdp: FSDPConfig | Mapping[str, Any] | bool | None = None) -> None:
        super().__init__()
        self.fsdp = FSDPConfig.coerce(fsdp)
        depth: dict[str, Any] | None = None
        if isinstance(mup, Mapping) and "base" in mup:
            extra = sorted(set(mup) - {"base", "depth", "base_depth"})
            if extra:
                raise ValueError(f"mup takes {{'base': ..., 'depth': ..., 'base_depth': ...}} only, got extra keys {extra}")
            from ..mup.depth import check_depth_rule

            rule = check_depth_rule(mup.get("depth"))
            if rule != "none":
                depth = {"depth": rule, "base_depth": mup.get("base_depth")}
                if depth["base_depth"] is None and isinstance(mup["base"], int) and not isinstance(mup["base"], bool):
                    raise ValueError(f"mup depth={rule!r} with a base width ({mup['base']}) needs base_depth, the "
                                     "proxy's number of layers: mup: {base: ..., depth: ..., base_depth: 6}")
                if isinstance(model, nn.Module):
                    raise ValueError(
                        f"mup depth={rule!r} is built into the reference models only (their residual-branch multiplier); "
                        "for your own nn.Module apply the multiplier (base_depth / depth)^α in its residual branches and "
                        "tag the branch parameters with lightning_optlab.mup.depth.tag_depth(model, rule, base_depth)")
            mup = mup["base"]
        self.mup_depth = depth
        # a plain attribute, not a submodule: a base nn.Module must not join this module's parameters
        object.__setattr__(self, "mup_base", mup)
        self.tokenizer = tokenizer
        if isinstance(optimizer, Mapping):  # as saved in the hyperparameters (load_from_checkpoint)
            optimizer = OptimizerSpec(**optimizer)
        spec = optimizer or OptimizerSpec()
        if mup is not None and not spec.mup:
            spec = dataclasses.replace(spec, mup=True)
        if isinstance(model, nn.Module):
            self.model: nn.Module | None = model
            self._model_spec = None
            self._forward_kwargs = _forward_kwargs(model)
            # the optimizer spec in hparams.yaml (TensorBoard's HPARAMS view compares runs by it)
            self.save_hyperparameters({"optimizer": dataclasses.replace(spec).to_dict()})
            if mup is not None:
                from ..mup import hf_to_mup, is_hf_model, set_base_shapes

                if isinstance(mup, int) and not isinstance(mup, bool) and is_hf_model(model):
                    hf_to_mup(model, base_width=mup)  # readout multiplier, base shapes from its config, init
                else:
                    set_base_shapes(model, mup)
        else:
            self.model = None
            self._model_spec = model
            self._forward_kwargs = {}
            hparams = {"model": model if isinstance(model, (str, Mapping)) else repr(model)}
            if mup is not None:
                hparams["mup"] = {"base": mup if isinstance(mup, (int, str, Mapping)) else repr(mup), **(depth or {})}
            hparams["optimizer"] = spec.to_dict()
            if self.fsdp is not None:
                hparams["fsdp"] = dataclasses.asdict(self.fsdp)
            self.save_hyperparameters(hparams)
        self.spec = spec
        self.sophia_seed = sophia_seed
        self.tokens_seen = 0
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity()

    def configure_model(self) -> None:
        fsdp = self._fsdp_config()
        if self.model is None:
            self._build_model(meta=fsdp is not None and fsdp.init == "meta")
        if fsdp is not None and not is_sharded(self.model):
            self._shard(fsdp)

    def _fsdp_config(self) -> FSDPConfig | None:
        """The sharding to apply: ``self.fsdp`` (or its defaults) under ``ModelParallelStrategy``, else None."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = getattr(self._trainer, "strategy", None)  # None also for the dry run's stand-in trainer (optlab check)
        if not isinstance(strategy, ModelParallelStrategy):
            if self.fsdp is not None and strategy is not None and not getattr(self, "_fsdp_warned", False):
                self._fsdp_warned = True
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"CausalLMModule(fsdp=...) is ignored: the trainer's strategy is {type(strategy).__name__}, "
                               "not ModelParallelStrategy, so the model is not sharded")
            return None
        return self.fsdp or FSDPConfig()

    def _data_parallel_mesh(self) -> Any:
        mesh = self.device_mesh
        names = mesh.mesh_dim_names or ()
        tp = mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1
        if tp != 1:
            raise ValueError(
                f"CausalLMModule shards with FSDP2 over the data-parallel dimension only, but the device mesh has "
                f"tensor_parallel_size={tp} (ModelParallelStrategy's default on one node is tensor_parallel_size="
                f"devices): use ModelParallelStrategy(data_parallel_size={mesh.size()}, tensor_parallel_size=1)"
            )
        return mesh["data_parallel"] if "data_parallel" in names else mesh

    def _shard(self, fsdp: FSDPConfig) -> None:
        model = self.model
        meta = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
        init = getattr(model, "init_weights", None)
        if meta and not callable(init):
            raise ValueError(
                f"the model has parameters on the meta device ({meta[0]!r}, ...) but no init_weights() to "
                "initialize them after sharding: build it on a real device, or give it an init_weights() method"
            )
        shard_model(model, self._data_parallel_mesh(), fsdp)
        # The strategy moves and converts the sharded model after this hook; FSDP2's DTensor
        # parameters go through torch.utils.swap_tensors there, which drops their attributes
        # (μP's infshape): they are put back, by name, wherever they are read.
        self._param_attrs = param_attrs(model)
        if meta:
            fan_in = {}
            if self.spec.mup and self._model_spec is not None:
                from ..mup import fan_in_mults

                fan_in = {"fan_in_mults": fan_in_mults(model)}
            device = self.trainer.strategy.root_device
            init_sharded(model, device, lambda: init(**fan_in), rank=self.trainer.global_rank)

    def _build_model(self, meta: bool) -> None:
        """Build the model from its spec (preset, config, mapping), on the meta device when ``meta``."""
        from contextlib import nullcontext

        from ..models import build_model

        overrides = {}
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        vocab = getattr(datamodule, "vocab_size", None)
        if vocab is None and datamodule is not None and hasattr(datamodule, "setup"):
            datamodule.setup("fit")
            vocab = getattr(datamodule, "vocab_size", None)
        if vocab is not None:
            overrides["vocab_size"] = vocab
            self._record_vocab(vocab)
        with torch.device("meta") if meta else nullcontext():
            if self.mup_base is not None:
                from ..mup import build_mup_model

                self.model = build_mup_model(self._model_spec, base=self.mup_base, **(self.mup_depth or {}), **overrides)
            else:
                self.model = build_model(self._model_spec, **overrides)
        self._forward_kwargs = _forward_kwargs(self.model)
        seq_len = getattr(getattr(datamodule, "config", None), "seq_len", None)
        block = getattr(getattr(self.model, "config", None), "block_size", None)
        if isinstance(seq_len, int) and isinstance(block, int) and seq_len > block:
            raise ValueError(
                f"data.seq_len {seq_len} exceeds the model's block_size {block}: set model block_size ≥ {seq_len} "
                f"(e.g. model: {{preset: ..., block_size: {seq_len}}}) or data.seq_len ≤ {block}"
            )

    def _optimizer_identity(self) -> dict[str, Any]:
        """What a checkpoint's optimizer state belongs to: the algorithm and its mix parts."""
        return {"name": self.spec.name, "mix": [p.optimizer for p in self.spec.mix]}

    def _record_vocab(self, vocab: int) -> None:
        """Put the datamodule's vocabulary size into the saved model spec, so that
        ``CausalLMModule.load_from_checkpoint(path)`` rebuilds the same model without the data."""
        spec = self._model_spec
        if isinstance(spec, str):
            spec = {"preset": spec}
        if not isinstance(spec, Mapping):
            return  # a config object: the hyperparameters hold only its repr
        spec = {**spec, "vocab_size": int(vocab)}
        self._model_spec = spec
        if "model" in self.hparams:
            self.hparams["model"] = spec

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        vocab = getattr(datamodule, "vocab_size", None)
        rows = _vocab_rows(self.model)
        if isinstance(vocab, int) and rows is not None and vocab > rows:
            raise ValueError(
                f"the datamodule's tokenizer has {vocab} ids but the model's output has {rows} logits: build the model "
                f"with vocab_size ≥ {vocab} (e.g. config.vocab_size = datamodule.vocab_size), or use the model's own "
                "tokenizer for the data (LMDataModule(tokenizer='path/to/tokenizer.json'))"
            )

    def forward(self, idx: Tensor) -> Tensor:
        if self.model is None:
            raise RuntimeError("the model is built in configure_model; call it (or fit) before forward")
        return logits_of(self.model(idx, **self._forward_kwargs))

    def _loss(self, logits: Tensor, targets: Tensor, train: bool) -> Tensor:
        if train and hasattr(self.model, "loss"):
            return self.model.loss(logits, targets)
        flat = logits.reshape(-1, logits.shape[-1])
        flat = flat.float() if flat.element_size() < 4 else flat  # at least float32 (float64 stays float64)
        return F.cross_entropy(flat, targets.reshape(-1))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        logits = self(x)
        loss = self._loss(logits, y, train=True)
        # The sampled labels come from a generator seeded by the step, so a resumed run draws
        # exactly what the uninterrupted run drew (the global RNG is not checkpointed).
        gen = torch.Generator(device=logits.device).manual_seed(self.sophia_seed + self.global_step)
        run_training_step_hooks(self.optimizers(), logits=logits, loss=loss, generator=gen)
        self.tokens_seen += y.numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen))
        return loss

    def on_validation_epoch_start(self) -> None:
        # Fresh metric states in this loop's grad mode: states left by a `trainer.validate` under
        # inference mode cannot be updated by a later validation under no_grad.
        self.val_loss.reset()
        self.val_ppl.reset()

    def validation_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        logits = self(x)
        loss = self._loss(logits, y, train=False)
        self.val_loss.update(loss, weight=y.numel())
        self.val_ppl.update(logits.float(), y)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/ppl", self.val_ppl)
        return loss

    def on_validation_epoch_end(self) -> None:
        # TensorBoard's HPARAMS view compares runs by `hp_metric`: the latest validation loss
        if not self.trainer.sanity_checking and self.val_loss.update_count > 0:
            self.log("hp_metric", self.val_loss.compute())

    def configure_optimizers(self) -> Any:
        self._restore_param_attrs()
        return configure(self, self.spec)

    def _restore_param_attrs(self) -> None:
        saved = getattr(self, "_param_attrs", None)
        if saved and self.model is not None:
            reattach_param_attrs(self.model, saved)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restore_param_attrs()
        if self._trainer is not None and self.trainer.optimizers:
            # which parameter each position of the optimizer state is: what turns a one-file checkpoint into
            # a distributed one (lightning_optlab.checkpoint.to_distributed_checkpoint), names keyed by position
            names = {id(p): n for n, p in self.named_parameters()}
            checkpoint["optlab_param_names"] = [[names.get(id(p)) for g in opt.param_groups for p in g["params"]]
                                                for opt in self.trainer.optimizers]
        checkpoint["optlab_tokens_seen"] = self.tokens_seen
        checkpoint["optlab_optimizer"] = self._optimizer_identity()
        if self.spec.mup and self.model is not None:
            from ..mup import base_shapes_state

            checkpoint["optlab_mup_base_shapes"] = base_shapes_state(self.model)
            from ..mup.depth import depth_state

            checkpoint["optlab_mup_depth"] = depth_state(self.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("optlab_tokens_seen", 0))
        saved_opt = checkpoint.get("optlab_optimizer")
        asked = self._optimizer_identity()
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"  # a resume, not load_from_checkpoint
        if fitting and saved_opt is not None and saved_opt != asked:
            # the optimizer state in the checkpoint belongs to another algorithm: loading it would
            # fail deep inside torch (a missing group key) or, worse, run with the wrong state
            raise ValueError(
                f"this checkpoint was trained with optimizer {_describe(saved_opt)}, but the config asks for "
                f"{_describe(asked)}; resume with the checkpoint's optimizer, or start a new run "
                "(initialize from the checkpoint's weights without ckpt_path)"
            )
        saved = checkpoint.get("optlab_mup_base_shapes")
        self._restore_param_attrs()
        if saved is not None and self.model is not None:
            if not self.spec.mup:
                raise ValueError("this checkpoint was trained with μP; resume with the same `mup` base "
                                 "(CausalLMModule(..., mup=...)) so the per-group learning rates match")
            from ..mup import check_base_shapes

            check_base_shapes(self.model, saved)
            if "optlab_mup_depth" in checkpoint:  # older checkpoints predate depth rules (width-only μP)
                from ..mup.depth import check_depth_state

                check_depth_state(self.model, checkpoint["optlab_mup_depth"])


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """``{"use_cache": False}`` for a model whose forward takes it (Hugging Face): training needs no KV cache."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _vocab_rows(model: nn.Module | None) -> int | None:
    """The number of logits of a model that says (``config.vocab_size``), else None."""
    rows = getattr(getattr(model, "config", None), "vocab_size", None)
    return rows if isinstance(rows, int) else None


def _describe(opt: Mapping[str, Any]) -> str:
    mix = opt.get("mix") or []
    return repr(opt.get("name")) + (f" with mix parts {mix}" if mix else "")
