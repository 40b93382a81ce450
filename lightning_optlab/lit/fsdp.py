"""FSDP2 for ``CausalLMModule``: ``fully_shard`` per transformer block, then the root.

Used by :meth:`CausalLMModule.configure_model` when the trainer's strategy is Lightning's
``ModelParallelStrategy`` (Lightning's FSDP2 strategy: it calls ``configure_model`` under a device mesh
and leaves the parallelization to the module). Torch only apart from that hook.

The sharding unit of a model is, in order of preference: the modules its ``optlab_shard_units()``
returns; a Hugging Face model's ``_no_split_modules`` classes (``LlamaDecoderLayer``, ``GPT2Block``);
the entries of its ``blocks`` ModuleList. The root is sharded last, so the embedding, the final norm
and the readout (tied or not) form one group.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal, Mapping

import torch
from torch import nn

__all__ = ["FSDPConfig", "shard_units", "shard_model", "is_sharded", "init_sharded", "param_attrs", "reattach_param_attrs"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# attributes the pack hangs on parameters, which fully_shard's new DTensor parameters would lose


@dataclasses.dataclass(kw_only=True)
class FSDPConfig:
    """How :class:`~lightning_optlab.lit.CausalLMModule` shards its model under ``ModelParallelStrategy``.

    ``init`` decides how a model the module builds itself gets its weights:

    * ``"meta"`` (default): built on the ``meta`` device, sharded, ``to_empty(device)``, then the model's
      own ``init_weights`` on the shards. No rank ever holds the whole model. Every shard has the
      right distribution (same std, zeros and ones where the init puts them), each rank drawing
      its shards from ``seed + rank``; the values differ from an unsharded init with the same seed.
    * ``"full"``: built and initialized whole on the CPU of every rank (the same values as one process
      with the same seed), then sharded and moved. For parity checks and models that fit in host memory.

    A model passed to the module as an ``nn.Module`` is sharded as it is (its weights are kept).
    """

    #: "meta" (no rank holds the whole model) or "full" (exactly the unsharded init of the same seed)
    init: Literal["meta", "full"] = "meta"
    #: free the gathered weights of a block after its forward (True: least memory; False: no re-gather in backward)
    reshard_after_forward: bool = True
    #: mixed precision: the dtype of the gathered weights in forward/backward (e.g. "bfloat16"); None keeps the parameters' dtype
    param_dtype: str | None = None
    #: mixed precision: the dtype of the gradient reduce-scatter (e.g. "float32"); None keeps param_dtype's
    reduce_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.init not in ("meta", "full"):
            raise ValueError(f"fsdp.init must be 'meta' or 'full', got {self.init!r}")
        for key in ("param_dtype", "reduce_dtype"):
            value = getattr(self, key)
            if value is not None and value not in _DTYPES:
                raise ValueError(f"fsdp.{key} must be one of {sorted(_DTYPES)} or None, got {value!r}")

    @classmethod
    def coerce(cls, value: Any) -> "FSDPConfig | None":
        """None, True (the defaults), a mapping (as from YAML) or an ``FSDPConfig``."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"fsdp takes {[f.name for f in dataclasses.fields(cls)]}, got unknown keys {unknown}")
            return cls(**value)
        raise TypeError(f"fsdp must be None, True, a mapping or an FSDPConfig, got {type(value).__name__}")

    def mp_policy(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=_DTYPES.get(self.param_dtype or ""),
                                    reduce_dtype=_DTYPES.get(self.reduce_dtype or ""))


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules to ``fully_shard`` one by one before the root (see the module docstring)."""
    custom = getattr(model, "optlab_shard_units", None)
    if callable(custom):
        return list(custom())
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    if no_split:
        return [m for m in model.modules() if type(m).__name__ in no_split]
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    return []


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` (FSDP2 turns the module's class into ``FSDP<Class>``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def param_attrs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{parameter name: {attribute: value}}`` of the pack's attributes on the parameters: μP's ``infshape``
    and every ``optlab_*`` tag (role, ``optlab_in_out`` orientation, ``optlab_fused_qkv`` heads, ...)."""
    return {n: {a: v for a, v in vars(p).items() if a == "infshape" or a.startswith("optlab_")}
            for n, p in model.named_parameters()}


def reattach_param_attrs(model: nn.Module, attrs: Mapping[str, Mapping[str, Any]]) -> None:
    """Put back the attributes (μP's ``infshape``, ...) saved by name before ``fully_shard``.

    ``fully_shard`` replaces every parameter by a new ``nn.Parameter`` holding a DTensor, with the
    same fully qualified name but none of the old attributes. A DTensor's ``shape`` is the logical
    (global) one, so μP's ``infshape`` still matches it.
    """
    for name, p in model.named_parameters():
        for key, value in attrs.get(name, {}).items():
            setattr(p, key, value)


def shard_model(model: nn.Module, mesh: Any, config: FSDPConfig) -> nn.Module:
    """``fully_shard`` every unit of :func:`shard_units`, then the root, over ``mesh`` (1-D: data parallel).

    Parameter names (fully qualified) and the pack's parameter attributes are kept, so the
    per-role groups and μP's base shapes resolve on the sharded model as on the plain one.
    """
    from torch.distributed.fsdp import fully_shard

    attrs = param_attrs(model)
    units = shard_units(model)
    if not units:
        warnings.warn(f"{type(model).__name__} declares no transformer blocks (no `blocks` ModuleList, no "
                      "`_no_split_modules`, no `optlab_shard_units()`): FSDP2 shards it as one unit, so every "
                      "rank gathers the whole model in forward", stacklevel=2)
    kwargs = {"mesh": mesh, "reshard_after_forward": config.reshard_after_forward, "mp_policy": config.mp_policy()}
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    reattach_param_attrs(model, attrs)
    return model


@torch.no_grad()
def init_sharded(model: nn.Module, device: torch.device, init: Any, rank: int) -> None:
    """Materialize a meta-built sharded model on ``device`` and run ``init()`` on its shards.

    Each rank draws from ``torch.initial_seed() + rank`` (in a forked RNG, so the training's own
    RNG stream is untouched): with one shared seed every rank would draw the same values, and the
    rows of every matrix would repeat world-size times.
    """
    attrs = param_attrs(model)
    model.to_empty(device=device)  # swaps the DTensor parameters' contents, attributes included
    reattach_param_attrs(model, attrs)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if device.type != "cpu" else "cuda"):
        torch.manual_seed(torch.initial_seed() + rank)
        init()
